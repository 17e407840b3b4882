"""TensorFlow imported without its start-up banner, and with oneDNN's kernels left on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_tensorflow_imports_without_its_banner_and_with_onednn_on():
    code = (
        "import os, sys\n"
        "from pipeline.quiet import quiet_tensorflow_import, stderr_without\n"
        "quiet_tensorflow_import()\n"
        "import keras  # imports tensorflow (the Keras backend) through the quiet loader\n"
        "from tensorflow.python.util import _pywrap_util_port\n"
        "print(_pywrap_util_port.IsMklEnabled())\n"
        "with stderr_without(('drop me',)):\n"
        "    os.write(2, b'keep me\\ndrop me\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"  # oneDNN on: TensorFlow's fast CPU kernels
    assert result.stderr == "keep me\n"  # the banner gone; other output written back


@pytest.mark.slow
def test_without_the_hook_tensorflow_prints_its_banner():
    """The banner the hook hides is real (a TensorFlow upgrade may change its words)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "oneDNN custom operations are on" in result.stderr
