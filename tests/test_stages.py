import pytest

from mindspeed_rl_r3.routing import MoEModelSpec, RoutingError
from mindspeed_rl_r3.routing.stages import PipelineSplit, moe_layers_on_stage

# (num_layers, pp, vpp, first, last, account_embedding, account_loss)
SPLITS = [
    (8, 1, None, None, None, False, False),
    (8, 2, None, None, None, False, False),
    (12, 4, 3, None, None, False, False),
    (10, 4, None, 1, 3, False, False),
    (10, 3, None, 2, None, False, False),
    (10, 3, None, None, 4, False, False),
    (16, 4, 2, 2, 6, False, False),
    (7, 2, None, None, None, True, False),
    (6, 4, None, None, None, True, True),
    (10, 4, 3, None, None, True, True),
    (48, 4, None, None, None, False, False),
]


@pytest.fixture(scope="module")
def megatron_layer_numbers():
    """The real megatron-core 0.12.x functions, with parallel_state ranks patched per call."""
    core = pytest.importorskip("megatron.core")
    if not core.__version__.startswith("0.12."):
        pytest.skip("the split is checked against core 0.12.x, MindSpeed-RL's pin")
    from megatron.core import parallel_state
    from megatron.core.transformer import transformer_block, transformer_layer
    from megatron.core.transformer.transformer_config import TransformerConfig

    def numbers(num_layers, pp, vpp, first, last, acc_emb, acc_loss, pp_rank, vpp_rank, monkeypatch):
        config = TransformerConfig(
            num_layers=num_layers,
            hidden_size=8,
            num_attention_heads=1,
            pipeline_model_parallel_size=pp,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
            account_for_embedding_in_pipeline_split=acc_emb,
            account_for_loss_in_pipeline_split=acc_loss,
            pipeline_dtype=None if pp == 1 else __import__("torch").float32,
        )
        first_virtual = vpp_rank == 0 or vpp is None
        last_virtual = vpp is None or vpp_rank == vpp - 1
        patches = {
            "get_pipeline_model_parallel_rank": lambda: pp_rank,
            "get_pipeline_model_parallel_world_size": lambda: pp,
            "get_virtual_pipeline_model_parallel_rank": lambda: vpp_rank,
            "get_virtual_pipeline_model_parallel_world_size": lambda: vpp,
            "get_pipeline_model_parallel_decoder_start": lambda: None,
            "is_inside_encoder": lambda: False,
            "is_pipeline_first_stage": lambda ignore_virtual=False: pp_rank == 0 and (ignore_virtual or first_virtual),
            "is_pipeline_last_stage": lambda ignore_virtual=False: (
                pp_rank == pp - 1 and (ignore_virtual or last_virtual)
            ),
        }
        for name, fn in patches.items():
            monkeypatch.setattr(parallel_state, name, fn)
        offset = transformer_layer.get_transformer_layer_offset(config)
        count = transformer_block.get_num_layers_to_build(config)
        return list(range(offset + 1, offset + count + 1))

    return numbers


@pytest.mark.parametrize("split", SPLITS)
def test_stage_layers_match_megatron(split, megatron_layer_numbers, monkeypatch):
    num_layers, pp, vpp, first, last, acc_emb, acc_loss = split
    ours = PipelineSplit(num_layers, pp, vpp, first, last, acc_emb, acc_loss)
    covered = []
    for vpp_rank in range(vpp or 1):
        for pp_rank in range(pp):
            want = megatron_layer_numbers(*split, pp_rank, vpp_rank if vpp else None, monkeypatch)
            got = ours.layer_numbers(pp_rank, vpp_rank)
            assert got == want, (pp_rank, vpp_rank)
            covered += got
    assert sorted(covered) == list(range(1, num_layers + 1))


def test_noop_layers_are_skipped_and_shift_hf_indices():
    spec = MoEModelSpec(num_layers=6, topk=2, num_experts=8, moe_layers=(0, 1, 3, 4, 5))  # HF layer 2 is dense
    # Megatron has 8 layers: 0-based ids 2 and 7 are noop. Megatron layer 4 (id 3) is HF layer 2: dense.
    layers, numbers = moe_layers_on_stage(spec, range(1, 9), noop_layers=[2, 7])
    assert numbers == [1, 2, 5, 6, 7]
    assert layers == [0, 1, 2, 3, 4]
    stage = PipelineSplit(8, pp_size=2).layer_numbers(1)
    assert moe_layers_on_stage(spec, stage, noop_layers=[2, 7]) == ([2, 3, 4], [5, 6, 7])


def test_bad_splits_are_refused():
    with pytest.raises(RoutingError, match="do not split over pp=3"):
        PipelineSplit(10, pp_size=3)
    with pytest.raises(RoutingError, match="middle stages"):
        PipelineSplit(10, pp_size=3, first_stage_layers=3).layer_numbers(0)
    with pytest.raises(RoutingError, match="past the model"):
        moe_layers_on_stage(MoEModelSpec(num_layers=2, topk=1, num_experts=2), [1, 2, 3])
