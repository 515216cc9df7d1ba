# lstm-serve server image.
#   docker build -t lstm-serve .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 lstm-serve           # the bundled models
#   docker run --rm -v "$PWD/models:/models:ro" -p 127.0.0.1:50051:50051 lstm-serve     # your own repository
#
# Two stages. The build stage installs both packages and their dependencies into a virtual environment,
# /opt/lstm-serve, compiled to bytecode as it is installed; the runtime stage copies that one directory (one layer,
# nothing copied that a later layer deletes) next to the models and a non-root user. No compiler, no pip, no pip cache,
# no source tree in the final image.
#
# PYTHON_IMAGE is any image with python3 (>= 3.11, with its venv module) on PATH, the same for both stages: the
# official python image by default; where no registry is reachable, an image made from Debian packages
# (tests/deploy/engine.py makes one with debootstrap: python3, python3-venv).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN python3 -m venv /opt/lstm-serve
WORKDIR /src
COPY client/ client/
COPY server/ server/
# pip writes the .pyc files here, as root: the runtime user could not write them, and without them every start and
# every health probe would compile numpy, grpc and pydantic again (seconds each, longer than the probe's timeout).
RUN /opt/lstm-serve/bin/pip install --no-cache-dir ./client ./server \
 && /opt/lstm-serve/bin/pip uninstall --yes --quiet pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
# Bytecode of the interpreter's own library too, for base images shipped without it (compileall writes only what is
# missing, so an image that has it gets an empty layer).
RUN groupadd --system --gid 10001 lstm \
 && useradd --system --uid 10001 --gid lstm --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lstm \
 && python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" >/dev/null
COPY --from=build /opt/lstm-serve /opt/lstm-serve
COPY --chown=root:root models/ /models/

# Listen on every interface inside the container; publish ports to choose who can reach them.
ENV PATH=/opt/lstm-serve/bin:$PATH \
    LSTM_SERVE_HOST=0.0.0.0 \
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
# Without --target, `lstm-serve health` asks the address that `serve` reads from LSTM_SERVE_HOST and LSTM_SERVE_PORT
# (a wildcard host on loopback), so the probe follows a port changed through the environment; on a host network a
# fixed address would reach whatever other server owns it. (Set the port through LSTM_SERVE_PORT, not `serve --port`.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["lstm-serve", "health", "--timeout", "2"]
# Exec form: the server is PID 1 and gets SIGTERM itself; it then stops taking calls and drains for
# LSTM_SERVE_SHUTDOWN_GRACE seconds (keep docker's stop timeout above it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lstm-serve"]
CMD ["serve"]
