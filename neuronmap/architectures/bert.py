"""BERT and RoBERTa: post-LayerNorm encoder blocks, learned positions and token types, bidirectional attention.

`ln1` is the LayerNorm after attention and `ln2` the one after the MLP, as in TransformerLens's BERT. Unlike
TransformerLens (which takes them before those LayerNorms), `hook_resid_mid` and `hook_resid_post` are the
LayerNorms' outputs, so they equal `ln1.hook_normalized` and `ln2.hook_normalized`; `hook_attn_out` is the
attention output projection's output, before the residual addition. There is no final LayerNorm hook.
"""

from ..hooks import HeadSplit
from .base import Norm, block, input, output, per_prompt, point, register


@register("bert", "roberta")
def hook_points(model):
    base, config = model.base_model, model.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    embeddings = base.embeddings
    yield point("hook_embed", output(embeddings.word_embeddings))
    yield point("hook_pos_embed", per_prompt(embeddings.position_embeddings, base))
    yield point("hook_token_type_embed", output(embeddings.token_type_embeddings))
    for layer, blk in enumerate(base.encoder.layer):
        attn = blk.attention.self
        yield from block(
            layer,
            attn,
            ln1=Norm(blk.attention.output.LayerNorm),
            ln2=Norm(blk.output.LayerNorm),
            post_ln=True,
            resid_pre=input(blk),
            q=output(attn.query, HeadSplit(n_heads, d_head)),
            k=output(attn.key, HeadSplit(n_heads, d_head)),
            v=output(attn.value, HeadSplit(n_heads, d_head)),
            z=input(blk.attention.output.dense, HeadSplit(n_heads, d_head)),
            attn_out=output(blk.attention.output.dense),
            resid_mid=output(blk.attention.output),
            mlp_pre=output(blk.intermediate.dense),
            mlp_post=input(blk.output.dense),
            mlp_out=output(blk.output.dense),
            resid_post=output(blk),
        )
