# Ferro's two entry points on a fresh Debian 12 machine:
#   make up    — install missing host packages, build, run the all-in-one cloud
#   make test  — install missing host packages, then lint and run every test tier
.PHONY: up test deps build lint unit

SHELL := /bin/bash
CARGO ?= cargo

up: deps build
	./target/debug/ferro up

test: deps lint unit

deps:
	@scripts/install-host-deps.sh

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked
