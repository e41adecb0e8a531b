"""Llama and the families that share its module layout (verified: Mistral, Qwen2): separate q/k/v projections
(k and v with the key-value heads of grouped-query attention), rotary positions, gated MLP, RMSNorm.

As in TransformerLens, `mlp.hook_pre` is the gate projection (before the activation), `mlp.hook_pre_linear`
the up projection, and `mlp.hook_post` the input of the down projection.
"""

from ..hooks import HeadSplit
from .base import Norm, block, final_norm, input, output, point, register


@register("llama", "mistral", "qwen2")
def hook_points(model):
    base, config = model.base_model, model.config
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads
    yield point("hook_embed", output(base.embed_tokens))
    for layer, blk in enumerate(base.layers):
        attn, mlp = blk.self_attn, blk.mlp
        d_head = attn.head_dim
        yield from block(
            layer,
            attn,
            ln1=Norm(blk.input_layernorm, rms=True),
            ln2=Norm(blk.post_attention_layernorm, rms=True),
            resid_pre=input(blk),
            q=output(attn.q_proj, HeadSplit(n_heads, d_head)),
            k=output(attn.k_proj, HeadSplit(n_kv_heads, d_head)),
            v=output(attn.v_proj, HeadSplit(n_kv_heads, d_head)),
            z=input(attn.o_proj, HeadSplit(n_heads, d_head)),
            attn_out=output(attn.o_proj),
            resid_mid=input(blk.post_attention_layernorm),
            mlp_pre=output(mlp.gate_proj),
            mlp_pre_linear=output(mlp.up_proj),
            mlp_post=input(mlp.down_proj),
            mlp_out=output(mlp),
            resid_post=output(blk),
        )
    yield from final_norm(Norm(base.norm, rms=True))
