"""The shipped samples: reachable without napari, named for the command line."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pytest

from napari_diffcut.files import samples
from napari_diffcut.files.samples import SAMPLES, make_blood_smear, sample_image


def test_sample_names_match_the_generators() -> None:
    assert sorted(SAMPLES) == ["blood-smear", "nuclei"]
    np.testing.assert_array_equal(sample_image("blood-smear"), make_blood_smear()[0])
    assert sample_image("nuclei").dtype == np.uint16


def test_unknown_sample_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"sample must be one of \['blood-smear', 'nuclei'\]"):
        sample_image("cells")


def test_samples_import_neither_napari_nor_torch() -> None:
    code = (
        "import sys; from napari_diffcut.files.samples import sample_image\n"
        "sample_image('blood-smear', 64)\n"
        "heavy = [m for m in ('napari', 'qtpy', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_doctests() -> None:
    result = doctest.testmod(samples, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 3
