"""GPT-2: fused q|k|v projection (`c_attn`), learned positions, pre-LayerNorm blocks."""

from ..hooks import HeadSplit
from .base import Norm, block, final_norm, input, output, per_prompt, point, register


@register("gpt2")
def hook_points(model):
    base, config = model.base_model, model.config
    n_heads, d_model = config.n_head, config.n_embd
    d_head = d_model // n_heads
    yield point("hook_embed", output(base.wte))
    yield point("hook_pos_embed", per_prompt(base.wpe, base))
    for layer, blk in enumerate(base.h):
        attn, mlp = blk.attn, blk.mlp
        yield from block(
            layer,
            attn,
            ln1=Norm(blk.ln_1),
            ln2=Norm(blk.ln_2),
            resid_pre=input(blk),
            q=output(attn.c_attn, HeadSplit(n_heads, d_head, offset=0)),
            k=output(attn.c_attn, HeadSplit(n_heads, d_head, offset=d_model)),
            v=output(attn.c_attn, HeadSplit(n_heads, d_head, offset=2 * d_model)),
            z=input(attn.c_proj, HeadSplit(n_heads, d_head)),
            attn_out=output(attn.c_proj),
            resid_mid=input(blk.ln_2),
            mlp_pre=output(mlp.c_fc),
            mlp_post=input(mlp.c_proj),
            mlp_out=output(mlp),
            resid_post=output(blk),
        )
    yield from final_norm(Norm(base.ln_f))
