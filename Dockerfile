# The proxy, the SDK and the examples in one image (docker-compose.yml runs
# proxies and shopping-cart user functions from it).
#   docker build -t cloudstate-proxy-py .
#   docker run --rm cloudstate-proxy-py cloudstate-proxy serve --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Code generation needs grpcio-tools and the google.api protos first (as in the
# Makefile): the installed package then includes the generated `cloudstate` modules.
RUN pip install 'grpcio-tools>=1.60,<2' 'googleapis-common-protos>=1.60,<2'

COPY pyproject.toml README.md ./
COPY protos ./protos
COPY cloudstate_proxy ./cloudstate_proxy
COPY user_function_sdk ./user_function_sdk
COPY examples ./examples
COPY tools ./tools

RUN python protos/generate.py && pip install .

# Run as an unprivileged user; /app stays the working directory so that
# `python -m examples.shoppingcart` and the health checks' `tools.launch` import.
RUN useradd --system --uid 10001 --home-dir /app cloudstate
USER cloudstate

# 9000: client port (gRPC), 9100: peer port (other proxies only), 8080: user function.
EXPOSE 9000 9100 8080

CMD ["cloudstate-proxy", "serve", "--help"]
