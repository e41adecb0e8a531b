"""GPT-NeoX (Pythia): q, k, v interleaved per head in `query_key_value`, rotary positions, and usually
parallel attention and MLP (then there is no `hook_resid_mid`, as in TransformerLens; `ln2` then normalises the
block's input, as TransformerLens's parallel blocks do)."""

from ..hooks import HeadSplit
from .base import Norm, block, final_norm, input, output, point, register


@register("gpt_neox")
def hook_points(model):
    base, config = model.base_model, model.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    yield point("hook_embed", output(base.embed_in))
    for layer, blk in enumerate(base.layers):
        attn, mlp = blk.attention, blk.mlp
        yield from block(
            layer,
            attn,
            ln1=Norm(blk.input_layernorm),
            ln2=Norm(blk.post_attention_layernorm),
            resid_pre=input(blk),
            q=output(attn.query_key_value, HeadSplit(n_heads, d_head, group=3, part=0)),
            k=output(attn.query_key_value, HeadSplit(n_heads, d_head, group=3, part=1)),
            v=output(attn.query_key_value, HeadSplit(n_heads, d_head, group=3, part=2)),
            z=input(attn.dense, HeadSplit(n_heads, d_head)),
            attn_out=output(attn.dense),
            resid_mid=None if blk.use_parallel_residual else input(blk.post_attention_layernorm),
            mlp_pre=output(mlp.dense_h_to_4h),
            mlp_post=input(mlp.dense_4h_to_h),
            mlp_out=output(mlp),
            resid_post=output(blk),
        )
    yield from final_norm(Norm(base.final_layer_norm))
