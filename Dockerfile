# GPU image for cluster runs (CUDA 12, PyTorch, DeepSpeed, flash-attn).
#   docker build -t latent-cot .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/latent-cot/runs latent-cot \
#       bash recipes/llama8b_simcot.sh
# The CPU path needs no image: `bash scripts/setup_cpu.sh` (see README).
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends git openssh-client pdsh ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/latent-cot
# Dependencies first so code edits do not invalidate the (slow) install layer.
COPY pyproject.toml README.md ./
RUN mkdir -p pipeline evaluation && touch pipeline/__init__.py evaluation/__init__.py \
    && pip install -e ".[dev]" \
    && MAX_JOBS=8 pip install --no-build-isolation "flash-attn>=2.6"
COPY . .
RUN pip install --no-deps -e .

# Pre-build DeepSpeed's fused Adam so the first launch on every node does not compile it.
RUN DS_BUILD_FUSED_ADAM=1 python -c "import deepspeed; print(deepspeed.__version__)" || true
CMD ["latent-train", "--help"]
