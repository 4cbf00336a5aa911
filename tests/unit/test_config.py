"""kvloom.config: a leaf, one field per option, the command line and the offline keyword arguments made
from the fields."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from kvloom.config import GROUPS, add_cli_args, kwargs_from_cli, split_kwargs


def test_config_is_a_leaf():
    """It imports nothing else of kvloom and not torch (core/ takes its choices from it)."""
    code = (
        "import sys, kvloom.config; "
        "mods = sorted(m for m in sys.modules if m.startswith('kvloom.') and m != 'kvloom.config'); "
        "assert not mods and 'torch' not in sys.modules, mods"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_option_is_a_flag_and_a_keyword_argument():
    p = argparse.ArgumentParser()
    add_cli_args(p)
    args = p.parse_args([])
    kwargs = kwargs_from_cli(args)
    names = {f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    assert set(kwargs) == names
    # the defaults on the command line are the fields' defaults
    assert kwargs == {f.name: f.default for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    args = p.parse_args(
        ["--block-size", "32", "--kv-cache-memory", "0.5", "--no-prefix-caching", "--backend", "torch"]
        + ["--scheduling-policy", "fair", "--speculative-method", "ngram", "--num-threads", "3"]
    )
    kwargs = kwargs_from_cli(args)
    assert kwargs["block_size"] == 32 and kwargs["kv_cache_memory"] == 1 << 29
    assert kwargs["enable_prefix_caching"] is False and kwargs["backend"] == "torch"
    assert kwargs["scheduling_policy"] == "fair" and kwargs["speculative_method"] == "ngram"
    assert kwargs["num_threads"] == 3
    args = p.parse_args(["--gpu-memory-utilization", "0.8", "--kv-cache-dtype", "int8"])
    assert kwargs_from_cli(args)["gpu_memory_utilization"] == 0.8  # a float, not the string
    assert kwargs_from_cli(args)["kv_cache_dtype"] == "int8"
    assert kwargs_from_cli(p.parse_args(["--enable-prefix-caching"]))["enable_prefix_caching"] is True
    with pytest.raises(SystemExit):
        p.parse_args(["--scheduling-policy", "random"])


def test_per_command_defaults():
    p = argparse.ArgumentParser()
    add_cli_args(p, defaults={"reserve_kv_cache": True, "seed": None})
    kwargs = kwargs_from_cli(p.parse_args([]))
    assert kwargs["reserve_kv_cache"] is True and kwargs["seed"] is None
    assert kwargs_from_cli(p.parse_args(["--no-reserve-kv-cache"]))["reserve_kv_cache"] is False


def test_split_kwargs_names_an_unknown_option():
    groups = split_kwargs({"block_size": 8, "max_num_seqs": 4, "dtype": "float32"})
    assert groups["cache"] == {"block_size": 8} and groups["scheduler"] == {"max_num_seqs": 4}
    assert groups["model"] == {"dtype": "float32"}
    with pytest.raises(TypeError, match="blok_size"):
        split_kwargs({"blok_size": 8})
