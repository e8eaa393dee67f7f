# Ferro's two entry points on a fresh Debian 12 machine:
#   make up    — install missing host packages, build, run the all-in-one cloud
#   make test  — install missing host packages, then lint and run every test tier
#
# Every target that compiles installs the missing host packages first (`deps`): etcd-client's
# build needs protoc and the well-known protos, so even `make build` needs them.
#
# `ferro up` keeps its state in /var/lib/ferro, which needs root; elsewhere pass another
# data directory: make up UP_FLAGS="--data-dir .ferro"
.PHONY: up test deps build lint unit

SHELL := /bin/bash
CARGO ?= cargo
UP_FLAGS ?=

up: build
	./target/debug/ferro up $(UP_FLAGS)

test: deps lint unit

deps:
	@scripts/install-host-deps.sh

build: deps
	$(CARGO) build --workspace --bins --locked

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: deps
	$(CARGO) test --workspace --locked --no-fail-fast
