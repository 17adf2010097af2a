# GPU image for cluster runs: CUDA PyTorch base + this project with its GPU extra (flash-attn).
#
#   docker build -t latent-cot .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/latent-cot/runs" \
#       -v "$HOME/.cache/huggingface:/cache/huggingface" -e HF_TOKEN latent-cot \
#       deepspeed recipes/llama8b_simcot.sh
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/latent-cot/runs" \
#       -v "$HOME/.cache/huggingface:/cache/huggingface" latent-cot \
#       latent-eval run --adapter latent --model runs/llama8b_simcot/export --benchmarks gsm8k_aug --seeds 41-45 \
#       --out runs/llama8b_simcot/eval
#
# The arguments after the image name are the command (tini runs it as PID 1's child and forwards
# SIGTERM, so a stopped container saves a checkpoint). --ipc=host: NCCL and data loading need more
# shared memory than Docker's 64 MB default. The CPU path needs no image: bash scripts/setup_cpu.sh.
# tests/test_recipes.py checks this file statically (no Docker engine in CI) and runs hadolint.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel
FROM ${BASE_IMAGE}

# Not a secret: the name only contains "TOKEN" (it silences the tokenizers fork warning).
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
    HF_HOME=/cache/huggingface
# Ubuntu's archive moves on: pinned apt versions would break the build within months.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client pdsh ninja-build tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/latent-cot
# Dependencies first, so code edits do not invalidate the slow install layer (flash-attn compiles).
# The constraint keeps the base image's CUDA torch: no dependency may swap it for another build.
COPY pyproject.toml README.md ./
RUN mkdir -p pipeline evaluation && touch pipeline/__init__.py evaluation/__init__.py \
    && python -c "import torch; print('torch==' + torch.__version__)" > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -e . \
    && MAX_JOBS=8 pip install -c /tmp/constraints.txt --no-build-isolation -e ".[gpu]"
COPY . .
RUN pip install --no-deps -e .

# Run as a non-root user. The Hugging Face cache and runs/ are volumes: weights and checkpoints
# outlive the container and are shared between runs (mount them, as in the commands above).
ARG USER_UID=1000
ARG USER_GID=1000
RUN groupadd --gid "${USER_GID}" latent \
    && useradd --uid "${USER_UID}" --gid "${USER_GID}" --create-home --shell /bin/bash latent \
    && mkdir -p /cache/huggingface /workspace/latent-cot/runs \
    && chown -R latent:latent /cache /workspace/latent-cot/runs
USER ${USER_UID}:${USER_GID}
VOLUME ["/cache/huggingface", "/workspace/latent-cot/runs"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["latent-train", "--help"]
