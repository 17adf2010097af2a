"""CODI's distilled position (method.codi.distill_position, issue 13's ablation): which column of the
teacher and of the student is compared, and that the choice reaches the loss and its gradients."""
import re

import pytest
import torch
from conftest import make_cfg

from pipeline.methods import StepContext
from pipeline.methods.batching import answer_segment


def rows_with_steps(examples, at_least: int):
    return [e for e in examples if len(e.steps) >= at_least]


def codi_built(build, position: str, **fields):
    cfg = make_cfg("codi", codi__distill_position=position, **fields)
    return cfg, build(cfg)


@pytest.mark.parametrize("position", ["before_answer", "after_reasoning"])
def test_both_columns_predict_the_same_token(build, gsm_examples, position):
    examples = rows_with_steps(gsm_examples, 2)
    _, built = codi_built(build, position)
    batch = built.collate(examples, 0)
    eot = built.loaded.token_ids["eot"]
    for r, ex in enumerate(examples):
        t, s = int(batch["teacher_pos"][r]), int(batch["student_pos"][r])
        answer, first = answer_segment(built.loaded.tokenizer, ex.answer)
        expected_next = answer[first] if position == "before_answer" else answer[0]
        # Both columns' outputs predict the same next token: the number, or the answer text's start.
        assert int(batch["teacher_suffix_ids"][r, t + 1]) == expected_next
        assert int(batch["student_suffix_ids"][r, s + 1]) == expected_next
        if position == "after_reasoning":
            assert s == 0 and int(batch["student_suffix_ids"][r, 0]) == eot
        else:
            assert s == first


def test_positions_change_the_distillation_and_it_trains_the_latents(build, gsm_examples):
    examples = rows_with_steps(gsm_examples, 2)
    values = {}
    for position in ("before_answer", "after_reasoning"):
        # alpha = gamma = 0: the loss is the distillation alone, so its gradient is the distillation's.
        cfg, built = codi_built(build, position, codi__alpha=0.0, codi__gamma=0.0)
        out = built.module.run(built.parts, built.collate(examples, 0), cfg, StepContext())
        values[position] = out.per_row["distill"]
        out.loss.backward()             # through the latents' rollout into the projection
        grad = built.parts["projection"][0].weight.grad
        assert grad is not None and float(grad.abs().sum()) > 0, position
    assert torch.isfinite(values["after_reasoning"]).all()
    assert not torch.allclose(values["before_answer"], values["after_reasoning"])


def test_after_reasoning_without_a_written_step_names_the_example(build, gsm_examples):
    one_step = [e for e in gsm_examples if len(e.steps) == 1][:1]
    assert one_step, "the fixture has 1-step examples"
    _, built = codi_built(build, "after_reasoning")
    with pytest.raises(ValueError, match=re.escape(one_step[0].source_id) + ".*distill_position=after_reasoning"):
        built.collate(one_step, 0)
    # With the last step kept the teacher writes one, and the same example collates.
    _, built = codi_built(build, "after_reasoning", codi__include_last_step=True)
    batch = built.collate(one_step, 0)
    assert int(batch["teacher_pos"][0]) >= 0


def test_after_reasoning_refuses_one_step_data_before_any_model_loads(tmp_path, capsys):
    """The check runs where the data is read (train.main, every rank, before DeepSpeed and the
    tokenizer): exit 2 naming the file, line, section and option, and nothing written."""
    from pipeline.config import load_config
    from pipeline.data.sources import DataError, read_section
    from pipeline.train import main

    data = tmp_path / "aug.txt"
    data.write_text("Tom has 3 apples and buys 4. He eats 2. How many?||<<3+4=7>> <<7-2=5>> #### 5\n"
                    "Ann has 2 pens and buys 6. How many?||<<2+6=8>> #### 8\n")
    out = tmp_path / "run"
    method = ["method.name=simcot", "method.simcot.decoder=full", "method.codi.distill_position=after_reasoning"]
    base = [*method, "data.train.0.format=gsm8k_aug", f"data.train.0.path={data}", f"train.output_dir={out}"]
    assert main(base) == 2
    shown = f"{data.parent.name}/{data.name}:2: "         # an example's source_id: folder/file:line
    err = capsys.readouterr().err
    assert f"data error: {shown}method.codi.distill_position=after_reasoning" in err
    assert "data.train example has 1 step(s) and include_last_step=False" in err
    assert not out.exists()
    # The validation set is collated the same way, so it is checked the same way.
    two_steps = tmp_path / "two.txt"
    two_steps.write_text(data.read_text().splitlines()[0] + "\n")
    on_eval = [*base, f"data.train.0.path={two_steps}", f"data.eval=[{{format: gsm8k_aug, path: {data}}}]"]
    read_section(load_config(None, on_eval), "train")
    with pytest.raises(DataError, match=re.escape(shown) + ".*data.eval example"):
        read_section(load_config(None, on_eval), "eval")
    # Keeping the last step gives every example a written step; distilling before the answer needs none.
    read_section(load_config(None, [*base, "method.codi.include_last_step=true"]), "train")
    read_section(load_config(None, [*base, "method.codi.distill_position=before_answer"]), "train")
