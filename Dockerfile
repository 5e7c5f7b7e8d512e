# Production image for the API, workers and beat (GPU workers need the NVIDIA runtime).
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip && rm -rf /var/lib/apt/lists/*
# The farm runs as an unprivileged user: a job that escaped its folders could not write the code or
# the system. It owns only its home (Hugging Face cache) and QUANTFARM_HOME (scratch, model cache).
RUN groupadd --system --gid 10001 quantfarm \
    && useradd --system --uid 10001 --gid quantfarm --home-dir /home/quantfarm --create-home --shell /usr/sbin/nologin quantfarm \
    && install -d -o quantfarm -g quantfarm -m 0750 /var/lib/quantfarm
WORKDIR /app
# .dockerignore keeps local state (.quantfarm/ with its database, .venv/, test-output/, .git) out.
COPY . /app
RUN python3.11 -m venv /venv && /venv/bin/pip install --no-cache-dir -e '.[methods]' gunicorn
ENV PATH=/venv/bin:$PATH QUANTFARM_HOME=/var/lib/quantfarm HOME=/home/quantfarm HF_HOME=/home/quantfarm/.cache/huggingface
# Numeric, so an orchestrator's runAsNonRoot check can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
CMD ["quantfarm", "api"]
