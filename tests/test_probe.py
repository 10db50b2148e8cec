"""Knowing a target function by the arguments it binds, whatever else its shape: releases add and reorder them."""

from __future__ import annotations

import pytest

from bridge_rng_patch import probe


def mpu_globals(data_parallel_random_init): ...


def with_format(data_parallel_random_init, ckpt_format="torch_dist"): ...


def pg_collection_positional(data_parallel_random_init, ckpt_format="torch_dist", pg_collection=None): ...


def pg_collection_keyword_only(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection): ...


def pg_collection_without_format(data_parallel_random_init, *, pg_collection=None): ...


@pytest.mark.parametrize(
    ("function", "described", "position"),
    [
        (mpu_globals, "get_rng_state(data_parallel_random_init) with mpu globals", None),
        (with_format, "get_rng_state(data_parallel_random_init, ckpt_format) with mpu globals", None),
        (pg_collection_positional, "get_rng_state(data_parallel_random_init, ckpt_format, pg_collection)", 2),
        (pg_collection_keyword_only, "get_rng_state(data_parallel_random_init, ckpt_format, *, pg_collection)", None),
        (pg_collection_without_format, "get_rng_state(data_parallel_random_init, *, pg_collection)", None),
    ],
)
def test_get_rng_state_is_known_by_the_parameters_it_binds(function, described, position):
    signature = probe.rng_state_signature(function)
    assert signature is not None
    assert signature.describe() == described
    assert signature.pg_collection_position == position


def fixed_with_module_name(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection, module_name=None): ...


def other_first_parameter(seed, ckpt_format="torch_dist"): ...


def extra_arguments(data_parallel_random_init, *args, **kwargs): ...


@pytest.mark.parametrize("function", [fixed_with_module_name, other_first_parameter, extra_arguments])
def test_get_rng_state_with_a_parameter_the_package_does_not_know_is_not_one_it_can_fix(function):
    assert probe.rng_state_signature(function) is None


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
