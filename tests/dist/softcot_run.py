"""SoftCoT and SoftCoT++ on 2 ranks under ZeRO-3, in one process group (tests/test_softcot_dist.py).

    torchrun --standalone --nproc_per_node 2 tests/dist/softcot_run.py SPEC.json

SPEC.json: {"out": DIR, "variants": [{"name", "overrides": [...]}]}. Each variant trains with
`pipeline.train.run` into DIR/<name>; at the end every rank gathers the partitioned module, and
rank 0 writes DIR/<name>/report.json: the logged losses, which weights changed compared with a
fresh (seeded) build, and how much of each frozen model this rank held while partitioned.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.strategy import get_rank, init_distributed  # noqa: E402
from pipeline.train import build_module, run  # noqa: E402


def held_fraction(module, part: str) -> float:
    """Elements of `part` this rank holds / elements of `part` (1.0 = not partitioned)."""
    params = [p for n, p in module.named_parameters() if n.startswith(f"parts.{part}.")]
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return local / full


def on_end(cfg, report: dict):
    def hook(strategy, tokenizer):
        module = strategy.engine.module
        report["held_fraction"] = {part: held_fraction(module, part) for part in ("lm", "assistant")}
        trained = {n for n, p in module.named_parameters() if p.requires_grad}
        with torch.no_grad(), strategy.gathered(module.parameters()):
            live = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        if get_rank() != 0:
            return
        fresh = {k: v.float() for k, v in build_module(cfg, tokenizer)[0].state_dict().items()}
        report["trained"] = sorted(trained)
        report["changed"] = sorted(k for k in live if not torch.equal(live[k], fresh[k]))
        report["frozen_identical"] = all(torch.equal(live[k], fresh[k]) for k in live if k not in trained)
    return hook


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    init_distributed(timeout_s=120)
    for variant in spec["variants"]:
        out = Path(spec["out"]) / variant["name"]
        cfg = load_config(None, variant["overrides"] + [f"train.output_dir={out}"])
        report: dict = {}
        result = run(cfg, on_end=on_end(cfg, report))
        if get_rank() == 0:
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            report.update(result=result, losses=[r["loss"] for r in log], ce=[r["loss/ce"] for r in log],
                          contrastive=[r.get("loss/contrastive") for r in log])
            (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
