"""Python's own Hub client, for comparison: `huggingface_hub.snapshot_download`.

Usage: python benches/snapshot_download.py REPO REVISION CACHE_DIR [MAX_WORKERS]

Downloads every file of REPO at REVISION into the Hub cache CACHE_DIR with
MAX_WORKERS threads (default 8) from the Hub at `HF_ENDPOINT` (the caller's),
prints the snapshot folder and exits 0; on any error, exits non-zero. Sends
`HF_TOKEN` when set. Plain HTTP only: no Xet, no telemetry, no progress bars.
"""

import os
import sys

# Before huggingface_hub is imported: it reads these once, at import.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_ENABLE_HF_TRANSFER"] = "0"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_SHARED_BLOBS"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)


def main(argv):
    if len(argv) not in (4, 5):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    repo, revision, cache_dir = argv[1], argv[2], argv[3]
    max_workers = int(argv[4]) if len(argv) == 5 else 8
    if "HF_ENDPOINT" not in os.environ:
        print("HF_ENDPOINT is not set", file=sys.stderr)
        return 2

    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo,
        revision=revision,
        cache_dir=cache_dir,
        max_workers=max_workers,
        # The caller's HF_TOKEN if any; never a token saved on this machine.
        token=os.environ.get("HF_TOKEN") or False,
    )
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
