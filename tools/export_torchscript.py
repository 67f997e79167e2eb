#!/usr/bin/env python3
"""Export a sentence-transformers or transformers text model to Harness's layout.

Run it with the Python of Harness's libtorch environment, which has the same torch
that the server links:

    $(libtorch/install --python) tools/export_torchscript.py SOURCE OUT_DIR

SOURCE is a local model folder or a Hub repo id (`org/name`, downloaded with
huggingface_hub, so `HF_TOKEN` and `HF_ENDPOINT` apply). OUT_DIR receives:

- `model.pt`: TorchScript taking `input_ids`, `attention_mask` (and
  `token_type_ids` where the model has them), each int64 `[batch, tokens]`, and
  returning the last hidden state `[batch, tokens, hidden]`;
- `tokenizer.json`: the model's fast tokenizer;
- `harness.json`: the task, the inputs in order, the output, and how to turn token
  vectors into one vector per text (pooling, normalization, the longest input),
  taken from sentence-transformers' settings where the model has them.

Upload the folder to the Hub (`hf upload org/name OUT_DIR`) and serve it with
`HARNESS_TASK=embedding HARNESS_MODEL_REPO=org/name`.

The export checks itself: the traced model must agree with the eager one on a
batch it was not traced with (other lengths, with padding) before it is written.
"""

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile

HARNESS_FORMAT = 1
# Torch's error on a traced graph that disagrees with eager: stop and say so.
TOLERANCE = 1e-4


def fail(message):
    print(f"export_torchscript: error: {message}", file=sys.stderr)
    sys.exit(1)


def say(message):
    print(f"export_torchscript: {message}", file=sys.stderr)


def resolve_source(source, revision):
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        fail(f"{source} is a file; give a model folder or a Hub repo id")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        fail("huggingface_hub is missing: run libtorch/install, which installs it")
    say(f"downloading {source}@{revision} from the Hub")
    return snapshot_download(source, revision=revision)


def read_json(path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def sentence_transformers_settings(folder):
    """Pooling, normalization and length from sentence-transformers' files, if any."""
    modules = read_json(os.path.join(folder, "modules.json"))
    if modules is None:
        return None
    settings = {"pooling": None, "normalize": False, "transformer_path": "", "max_seq_length": None}
    for module in modules:
        kind = module.get("type", "")
        path = os.path.join(folder, module.get("path", ""))
        if kind.endswith(".Transformer"):
            settings["transformer_path"] = module.get("path", "")
            config = read_json(os.path.join(path, "sentence_bert_config.json"), {})
            settings["max_seq_length"] = config.get("max_seq_length")
        elif kind.endswith(".Pooling"):
            settings["pooling"] = pooling_mode(read_json(os.path.join(path, "config.json"), {}))
        elif kind.endswith(".Normalize"):
            settings["normalize"] = True
        elif kind.endswith(".Dense"):
            fail("the model has a Dense layer after pooling, which Harness does not apply yet")
    return settings


def pooling_mode(config):
    if "pooling_mode" in config:  # newer sentence-transformers write one name
        mode = config["pooling_mode"]
    else:
        modes = [
            name
            for key, name in [
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                ("pooling_mode_weightedmean_tokens", "weightedmean"),
                ("pooling_mode_lasttoken", "lasttoken"),
            ]
            if config.get(key)
        ]
        if len(modes) != 1:
            fail(f"pooling {modes or 'none'}: Harness applies exactly one of mean, cls or max")
        mode = modes[0]
    if mode not in ("mean", "cls", "max"):
        fail(f"pooling '{mode}': Harness applies mean, cls or max")
    return mode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a model folder or a Hub repo id")
    parser.add_argument("out", help="the folder to write (created; must be empty if it exists)")
    parser.add_argument("--revision", default="main", help="Hub revision when SOURCE is a repo id")
    parser.add_argument("--pooling", choices=["mean", "cls", "max"], help="override the model's pooling")
    parser.add_argument("--normalize", choices=["true", "false"], help="override L2 normalization")
    parser.add_argument("--max-seq-length", type=int, help="override the longest input, in tokens")
    args = parser.parse_args()

    if os.path.isdir(args.out) and os.listdir(args.out):
        fail(f"{args.out} is not empty; give a new folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"{args.out} is a file; give a new folder")

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_source(args.source, args.revision)
    st = sentence_transformers_settings(folder)
    transformer_dir = os.path.join(folder, st["transformer_path"]) if st else folder

    tokenizer = AutoTokenizer.from_pretrained(transformer_dir, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        fail("the model has no fast tokenizer (tokenizer.json), which Harness needs")
    # Eager attention: the SDPA path picks its kernels by Python tests on the mask
    # that a trace would freeze.
    model = AutoModel.from_pretrained(transformer_dir, attn_implementation="eager")
    model.eval()

    position_limit = getattr(model.config, "max_position_embeddings", None) or 512
    max_seq_length = (
        args.max_seq_length
        or (st and st["max_seq_length"])
        or min(tokenizer.model_max_length, position_limit)
    )
    if max_seq_length > position_limit:
        fail(f"max_seq_length {max_seq_length} is past the model's {position_limit} positions")
    pooling = args.pooling or (st and st["pooling"]) or "mean"
    normalize = (args.normalize == "true") if args.normalize else bool(st and st["normalize"])

    parameters = inspect.signature(model.forward).parameters
    inputs = ["input_ids", "attention_mask"]
    if "token_type_ids" in parameters and "token_type_ids" in tokenizer.model_input_names:
        inputs.append("token_type_ids")

    class LastHiddenState(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            named = dict(zip(inputs, tensors))
            return self.model(**named, return_dict=True).last_hidden_state

    wrapper = LastHiddenState(model).eval()

    def batch(texts):
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")
        return tuple(encoded[name] for name in inputs)

    # Traced on a padded batch so the graph keeps the masking; checked on another.
    trace_batch = batch(["A short one.", "A rather longer sentence, so that the first one is padded."])
    check_batch = batch(["Three", "texts of other lengths than the trace", "x " * (max_seq_length + 20)])
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, trace_batch, check_trace=False, strict=False)
        traced = torch.jit.freeze(traced.eval()) if hasattr(torch.jit, "freeze") else traced
        expected = wrapper(*check_batch)
        got = traced(*check_batch)
    if got.shape != expected.shape:
        fail(f"the traced model gave shape {tuple(got.shape)}, the eager one {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if diff > TOLERANCE:
        fail(f"the traced model differs from the eager one by {diff:.2e} (> {TOLERANCE}); it would not serve the same vectors")
    say(f"traced model agrees with eager within {diff:.1e} on an unseen batch")

    os.makedirs(args.out, exist_ok=True)
    if os.listdir(args.out):
        fail(f"{args.out} is not empty; give a new folder")
    # Write into a temporary folder beside the output and move in at the end, so an
    # interrupted export leaves no half-written model.
    staging = tempfile.mkdtemp(prefix=".export-", dir=args.out)
    traced.save(os.path.join(staging, "model.pt"))
    tokenizer.backend_tokenizer.save(os.path.join(staging, "tokenizer.json"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    manifest = {
        "format": HARNESS_FORMAT,
        "task": "embedding",
        "model": "model.pt",
        "tokenizer": "tokenizer.json",
        "inputs": inputs,
        "outputs": ["token_embeddings"],
        "max_seq_length": int(max_seq_length),
        "pooling": pooling,
        "normalize": normalize,
        "dimension": int(expected.shape[-1]),
        "pad_token_id": int(pad_id),
        "source": args.source if not os.path.isdir(args.source) else os.path.basename(os.path.abspath(args.source)),
        "torch": torch.__version__,
    }
    with open(os.path.join(staging, "harness.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    for name in ("model.pt", "tokenizer.json", "harness.json"):
        os.replace(os.path.join(staging, name), os.path.join(args.out, name))
    shutil.rmtree(staging, ignore_errors=True)
    say(
        f"wrote {args.out}: inputs {inputs}, {pooling} pooling, normalize {normalize}, "
        f"max_seq_length {max_seq_length}, dimension {manifest['dimension']}"
    )


if __name__ == "__main__":
    main()
