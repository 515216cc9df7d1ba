# lstm-serve server image.
#   docker build -t lstm-serve .
#   docker run --rm -p 50051:50051 -p 9464:9464 lstm-serve            # the bundled models
#   docker run --rm -v "$PWD/models:/models:ro" -p 50051:50051 lstm-serve   # your own repository
#
# Two stages: wheels are built with pip's build tools, the runtime stage gets only the installed packages, the
# models and a non-root user. No compiler, no pip cache, no source tree in the final image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY client/ client/
COPY server/ server/
RUN pip wheel --no-cache-dir --wheel-dir /wheels ./client ./server

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 lstm \
 && useradd --system --uid 10001 --gid lstm --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lstm
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl && rm -rf /wheels
COPY --chown=root:root models/ /models/

# Listen on every interface inside the container; publish ports to choose who can reach them.
ENV LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_METRICS_HOST=0.0.0.0 \
    LSTM_SERVE_METRICS_PORT=9464 \
    LSTM_SERVE_MODEL_DIR=/models \
    LSTM_SERVE_LOG_JSON=true \
    PYTHONUNBUFFERED=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1

USER lstm:lstm
EXPOSE 50051 9464
# The gRPC health service, not a TCP probe: SERVING only once the models are loaded, NOT_SERVING while draining.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["lstm-serve", "health", "--target", "127.0.0.1:50051", "--timeout", "2"]
# Exec form: the server is PID 1 and gets SIGTERM itself; it then stops taking calls and drains for
# LSTM_SERVE_SHUTDOWN_GRACE seconds (keep docker's stop timeout above it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-serve"]
CMD ["serve"]
