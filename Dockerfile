# Production image for the API, workers and beat (GPU workers need the NVIDIA runtime).
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN python3.11 -m venv /venv && /venv/bin/pip install --no-cache-dir -e '.[methods]' gunicorn
ENV PATH=/venv/bin:$PATH QUANTFARM_HOME=/var/lib/quantfarm
EXPOSE 8000
CMD ["quantfarm", "api"]
