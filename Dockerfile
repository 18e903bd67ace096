# One image for every Leasehold process: `leasehold api`, `worker`, `beat`,
# `db upgrade` (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml constraints.txt README* ./
COPY app ./app
COPY workers ./workers
COPY schedules ./schedules
COPY sdk ./sdk
# No extras: the `local` extra's OpenBao dev server has no place in production.
RUN pip install -c constraints.txt . \
    && useradd --system --home-dir /var/lib/leasehold --create-home leasehold \
    && install -d -o leasehold /var/lib/leasehold/metrics \
    && rm -rf /src

# Leasehold's working files (beat's schedule) live here; configuration comes
# from LEASEHOLD_* variables and the mounted profiles file.
USER leasehold
WORKDIR /var/lib/leasehold
ENV LEASEHOLD_HOME=/var/lib/leasehold \
    LEASEHOLD_PROFILES_FILE=/etc/leasehold/profiles.toml

EXPOSE 8700
CMD ["leasehold", "api", "--host", "0.0.0.0"]
