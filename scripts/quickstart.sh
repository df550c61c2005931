#!/usr/bin/env bash
# Quick start, command 1: set up and run the main job. Trains Mult-VAE with the paper protocol on
# the bundled MovieLens ml-latest-small, scores the test users, saves the model bundle and prints
# Recall@20, Recall@50 and NDCG@100 with standard errors. Extra arguments go to `recvae train`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" ""
exec .venv/bin/recvae train --config pipelines/configs/ml-latest-small.toml \
    --output "${RECVAE_OUTPUT:-runs/quickstart}" "$@"
