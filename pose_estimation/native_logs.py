"""MediaPipe's and LiteRT's C++ start-up lines, kept off the console.

Their native code writes "INFO: Created TensorFlow Lite XNNPACK delegate", absl's "All log
messages before absl::InitializeLog()" and "Feedback manager requires a model with a single
signature" straight to file descriptor 2 when a graph or interpreter starts; no environment
variable of this mediapipe/ai-edge-litert reaches them. Around those calls the descriptor is
pointed at a temporary file, and every line except these known start-up notices is written
back to stderr, so nothing else is lost.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

START_UP_NOTICES = re.compile(
    r"INFO: Created TensorFlow Lite XNNPACK delegate"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|inference_feedback_manager\.cc.*Feedback manager requires a model with a single signature"
)


@contextmanager
def start_up_notices_hidden() -> Iterator[None]:
    """Run the block with native stderr captured; re-emit what is not a start-up notice."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line for line in capture.read().decode(errors="replace").splitlines(True)
                if not START_UP_NOTICES.search(line)
            ]  # fmt: skip
            if kept:
                sys.stderr.write("".join(kept))
