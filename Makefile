# Two entry points, both self-contained on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := build/demo

.PHONY: setup toolchains demo test test-slow lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled tiny Qwen-v1 model (no hub, no vendor toolchain).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/surgery fixture qwen --out $(DEMO)/tiny-qwen --revision 2023-11
	$(BIN)/surgery apply qwen --model $(DEMO)/tiny-qwen --seq-length 64 --dtype fp32
	$(BIN)/surgery apply qwen --model $(DEMO)/tiny-qwen-surgery --seq-length 64 --dtype fp32
	$(BIN)/surgery export $(DEMO)/tiny-qwen-surgery --out $(DEMO)/tiny-qwen-onnx --seq-length 64 --trust-remote-code
	$(BIN)/surgery verify $(DEMO)/tiny-qwen-onnx --trust-remote-code
	$(BIN)/surgery run $(DEMO)/tiny-qwen-onnx --prompt "Hello, how are you?" --chat --max-new-tokens 32
	$(BIN)/surgery optimize $(DEMO)/tiny-qwen-onnx --target generic
	$(BIN)/surgery run $(DEMO)/tiny-qwen-onnx --prompt "Hello, how are you?" --chat --max-new-tokens 32

# Vendor toolchains in their own environments under ~/.cache/surgery (SURGERY_HOME); an install that
# cannot run here (no Python 3.10, no registry) is reported and the tests that need it skip with the reason.
toolchains: $(STAMP)
	-$(BIN)/surgery toolchain install mnn
	-$(BIN)/surgery toolchain install sophgo
	-$(BIN)/surgery toolchain install rknn

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint toolchains
	$(BIN)/pytest -m "not slow"

# Realistic shapes (real hidden sizes and vocabularies, few layers): minutes each, GBs of disk.
test-slow: lint toolchains
	$(BIN)/pytest -m slow

clean:
	rm -rf $(VENV) build dist *.egg-info
