"""ParallelDims (distributed/dims.py): the one object `cfg.parallel` becomes, and the split's own rules,
the same for the trainer's process groups and for the planner."""

from __future__ import annotations

import dataclasses

import pytest

from nemo_rlsr.config import ConfigError, ParallelConfig, RLSRConfig
from nemo_rlsr.distributed.dims import ParallelDims
from nemo_rlsr.planner.layout import Layout


def test_every_parallel_key_reaches_the_dims():
    """Each `parallel.*` key set to a value of its own: each must arrive in its field, none dropped."""
    p = ParallelConfig(tensor_parallel=2, pipeline_parallel=3, context_parallel=5, expert_parallel=7,
                       expert_tensor_parallel=11, virtual_pipeline_parallel=13, num_layers_in_first_pipeline_stage=17,
                       num_layers_in_last_pipeline_stage=19, sequence_parallel=True, seed=23, collective_timeout_s=29)
    assert ParallelDims.from_config(p) == ParallelDims(tp=2, pp=3, cp=5, ep=7, etp=11, vpp=13, first_stage_layers=17,
                                                       last_stage_layers=19, sequence_parallel=True, seed=23,
                                                       timeout_s=29)
    values = [getattr(p, f.name) for f in dataclasses.fields(ParallelConfig)]
    assert sorted(map(int, values)) == sorted(map(int, ParallelDims.from_config(p).dims_fields().values()))


def test_derived_sizes():
    dims = ParallelDims(tp=2, pp=2, cp=2, ep=4, etp=1)
    assert dims.model_parallel == 8
    assert dims.data_parallel(16) == 2  # CP ranks of one DP rank share its rows
    assert dims.expert_data_parallel(16) == 2  # 16 / (ep 4 x etp 1 x pp 2)
    assert ParallelDims().virtual_stages == 1 and ParallelDims(pp=2, vpp=3).virtual_stages == 3
    assert ParallelDims(pp=4).layers_per_stage(8) == [2, 2, 2, 2]
    assert ParallelDims(pp=4, first_stage_layers=1, last_stage_layers=3).layers_per_stage(8) == [1, 2, 2, 3]
    assert ParallelDims(pp=1, first_stage_layers=1).layers_per_stage(8) == [8]


@pytest.mark.parametrize("dims,world,expected", [
    (ParallelDims(tp=2, cp=2), 6, "world size 6 is not divisible by tensor x pipeline x context parallel = 2 x 1 x 2"),
    (ParallelDims(tp=2, ep=4), 6, "world size 6 is not divisible by expert x expert-tensor x pipeline parallel = 4 x 1 x 1"),
    (ParallelDims(first_stage_layers=1), 1, "uneven pipeline stages need pipeline_parallel > 1 and no virtual stages"),
    (ParallelDims(pp=2, vpp=2, last_stage_layers=1), 2, "uneven pipeline stages need pipeline_parallel > 1 and no virtual stages"),
    (ParallelDims(vpp=2), 1, "parallel.virtual_pipeline_parallel needs pipeline_parallel > 1"),
    (ParallelDims(sequence_parallel=True), 2, "parallel.sequence_parallel needs tensor_parallel > 1"),
])
def test_a_split_the_world_cannot_hold_is_refused_naming_the_keys(dims, world, expected):
    assert dims.problems(world) == [expected]
    with pytest.raises(ConfigError, match=f"cannot run on {world} ranks"):
        dims.validate(world)


@pytest.mark.parametrize("dims,world", [(ParallelDims(), 1), (ParallelDims(tp=2, pp=2, cp=2), 16),
                                        (ParallelDims(tp=2, ep=2, etp=1, sequence_parallel=True), 2),
                                        (ParallelDims(pp=2, vpp=1, first_stage_layers=1), 2)])
def test_good_splits_pass(dims, world):
    assert dims.problems(world) == []


def test_the_planner_lays_out_the_same_dims_and_applies_the_same_rules():
    cfg = RLSRConfig()
    cfg.parallel.tensor_parallel, cfg.parallel.expert_parallel, cfg.parallel.seed = 2, 3, 99
    dims = ParallelDims.from_config(cfg.parallel)
    layout = Layout.of(cfg, nodes=1, gpus_per_node=4)
    assert isinstance(layout, ParallelDims) and layout.dims_fields() == dims.dims_fields()
    assert layout.world == 4 and layout.dp == dims.data_parallel(4) == 2
    from nemo_rlsr.distributed.layout import run_problems

    problems = run_problems(cfg, 4, None, None)
    assert dims.problems(4)[0] in problems  # the expert rule, worded once


def test_init_distributed_returns_the_dims_it_was_given_and_refuses_a_bad_split(single_rank):
    from nemo_rlsr.distributed.parallel import ParallelContext, init_distributed

    assert isinstance(single_rank, ParallelContext)
    assert single_rank.dims_fields() == ParallelDims().dims_fields()
    assert (single_rank.world_size, single_rank.dp, single_rank.dp_rank) == (1, 1, 0)
    # before megatron's groups or the RNGs are touched: the session's single rank is left as it was
    with pytest.raises(ConfigError, match="world size 1 is not divisible by tensor x pipeline x context parallel"):
        init_distributed(ParallelDims(tp=2))


def test_megatron_takes_the_sizes_under_these_names():
    """initialize_model_parallel and TransformerConfig of the installed megatron-core both take them."""
    import inspect

    from megatron.core.parallel_state import initialize_model_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    sizes = ParallelDims(tp=2, pp=3, cp=5, ep=7, etp=11, vpp=13).megatron_sizes()
    assert sorted(sizes.values()) == [2, 3, 5, 7, 11, 13]
    assert set(sizes) <= set(inspect.signature(initialize_model_parallel).parameters)
    assert set(sizes) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    dense = ParallelDims(tp=2, ep=7, etp=11).megatron_sizes(experts=False)
    assert "expert_model_parallel_size" not in dense and "expert_tensor_parallel_size" not in dense
