"""Knowing a target function by the arguments it binds, whatever else its shape: releases add and reorder them."""

from __future__ import annotations

import pytest

from bridge_rng_patch import probe
from bridge_rng_patch.loops import BRIDGE, MEGATRON_LM


def mpu_globals(data_parallel_random_init): ...


def with_format(data_parallel_random_init, ckpt_format="torch_dist"): ...


def pg_collection_positional(data_parallel_random_init, ckpt_format="torch_dist", pg_collection=None): ...


def pg_collection_keyword_only(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection): ...


def pg_collection_without_format(data_parallel_random_init, *, pg_collection=None): ...


def fixed_with_module_name(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection, module_name=None): ...


@pytest.mark.parametrize(
    ("function", "described", "position"),
    [
        (mpu_globals, "get_rng_state(data_parallel_random_init) with mpu globals", None),
        (with_format, "get_rng_state(data_parallel_random_init, ckpt_format) with mpu globals", None),
        (pg_collection_positional, "get_rng_state(data_parallel_random_init, ckpt_format, pg_collection)", 2),
        (pg_collection_keyword_only, "get_rng_state(data_parallel_random_init, ckpt_format, *, pg_collection)", None),
        (pg_collection_without_format, "get_rng_state(data_parallel_random_init, *, pg_collection)", None),
        (
            fixed_with_module_name,
            "get_rng_state(data_parallel_random_init, ckpt_format, *, pg_collection, module_name)",
            None,
        ),
    ],
)
def test_get_rng_state_is_known_by_the_parameters_it_binds(function, described, position):
    signature = probe.rng_state_signature(function, BRIDGE)
    assert signature is not None
    assert signature.describe() == described
    assert signature.position("pg_collection") == position


def with_unknown_keyword(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection, layout=None): ...


def other_first_parameter(seed, ckpt_format="torch_dist"): ...


def extra_arguments(data_parallel_random_init, *args, **kwargs): ...


@pytest.mark.parametrize("function", [with_unknown_keyword, other_first_parameter, extra_arguments])
def test_get_rng_state_with_a_parameter_the_package_does_not_know_is_not_one_it_can_fix(function):
    assert probe.rng_state_signature(function, BRIDGE) is None


def dist_load_0_1_0a0(load_dir, cfg, rank0, sharded_state_dict, iteration, release, checkpointing_context=None): ...


def dist_load_0_2(load_dir, ckpt_cfg, rank0, sharded_state_dict, iteration, release, checkpointing_context=None): ...


def dist_load_without_release(load_dir, ckpt_cfg, rank0, sharded_state_dict, iteration): ...


DIST_LOAD_ARGUMENTS = ("load_dir", "rank0", "sharded_state_dict", "iteration", "release")


@pytest.mark.parametrize("function", [dist_load_0_1_0a0, dist_load_0_2])
def test_dist_load_binds_its_arguments_whatever_the_config_parameter_is_called(function):
    assert probe.missing_parameters(function, DIST_LOAD_ARGUMENTS) == []


def test_dist_load_without_an_argument_the_wrapper_binds_names_it():
    assert probe.missing_parameters(dist_load_without_release, DIST_LOAD_ARGUMENTS) == ["release"]


def test_signature_is_described_without_annotations_or_defaults():
    def annotated(data_parallel_random_init: bool, ckpt_format: str = "torch_dist", *, pg_collection: object) -> dict:
        return {}

    assert probe.describe_signature(annotated) == "(data_parallel_random_init, ckpt_format, *, pg_collection)"


def megatron_lm_tree_0_11(use_dist_ckpt=False): ...


def megatron_lm_tree_0_12(ckpt_format): ...


def megatron_lm_0_17(ckpt_format, tp_group, pp_group): ...


def megatron_lm_0_19(ckpt_format, tp_group, pp_group, dp_cp_group=None, dp_group=None, key_prefix=""): ...


@pytest.mark.parametrize(
    ("function", "described", "dp_cp_group_at"),
    [
        (megatron_lm_tree_0_11, "get_rng_state(use_dist_ckpt) with mpu globals", None),
        (megatron_lm_tree_0_12, "get_rng_state(ckpt_format) with mpu globals", None),
        (megatron_lm_0_17, "get_rng_state(ckpt_format, tp_group, pp_group) with mpu globals", None),
        (megatron_lm_0_19, "get_rng_state(ckpt_format, tp_group, pp_group, dp_cp_group, dp_group, key_prefix)", 3),
    ],
)
def test_megatron_lm_get_rng_state_is_known_by_the_parameters_it_binds(function, described, dp_cp_group_at):
    signature = probe.rng_state_signature(function, MEGATRON_LM)
    assert signature is not None
    assert signature.describe() == described
    assert signature.position("dp_cp_group") == dp_cp_group_at


def test_one_loops_get_rng_state_is_not_taken_for_the_others():
    assert probe.rng_state_signature(megatron_lm_0_19, BRIDGE) is None
    assert probe.rng_state_signature(with_format, MEGATRON_LM) is None


def fsdp_load_before_5100(ckpt_format, state_dict, load_rng, ckpt_tp_pp, run_tp_pp):
    if ckpt_format == "torch_dist":
        ignore_rng_state = ckpt_tp_pp != run_tp_pp  # "(TP, PP) mismatch after resume": every release's torch_dist
    elif ckpt_format == "fsdp_dtensor":
        ignore_rng_state = not load_rng
    if "rng_state" in state_dict and not ignore_rng_state:
        return state_dict["rng_state"]


def fsdp_load_with_5100(ckpt_format, state_dict, load_rng, ckpt_tp_pp, run_tp_pp):
    if ckpt_format == "torch_dist":
        ignore_rng_state = ckpt_tp_pp != run_tp_pp
    elif ckpt_format == "fsdp_dtensor":
        tp_pp_match = ckpt_tp_pp == run_tp_pp
        ignore_rng_state = not (load_rng and tp_pp_match)
    if "rng_state" in state_dict and not ignore_rng_state:
        return state_dict["rng_state"]


def load_without_fsdp_dtensor(state_dict):
    if "rng_state" in state_dict:
        return state_dict["rng_state"]


@pytest.mark.parametrize(
    ("restore", "ignores"),
    [(fsdp_load_before_5100, False), (fsdp_load_with_5100, True), (load_without_fsdp_dtensor, None)],
)
def test_the_fsdp_dtensor_branch_of_a_load_tells_whether_it_compares_tp_and_pp(restore, ignores):
    """Bridge #5100 (0.6.0) compares the stored TP and PP in the fsdp_dtensor branch before it asks for RNG state;
    the torch_dist branch of every release does, so it must not count."""
    assert probe.fsdp_load_ignores_rng_after_model_parallel_change(restore) is ignores
