"""BERT and RoBERTa: post-LayerNorm encoder blocks, learned positions and token types, bidirectional attention.

As in TransformerLens's BERT, `hook_resid_mid` is the attention sub-block's output after its LayerNorm and
`hook_resid_post` the block's output after the second LayerNorm; there is no final LayerNorm hook.
"""

from ..hooks import HeadSplit
from .base import block, input, output, point, register


@register("bert", "roberta")
def hook_points(model):
    base, config = model.base_model, model.config
    n_heads = config.num_attention_heads
    d_head = config.hidden_size // n_heads
    embeddings = base.embeddings
    yield point("hook_embed", output(embeddings.word_embeddings))
    yield point("hook_pos_embed", output(embeddings.position_embeddings))
    yield point("hook_token_type_embed", output(embeddings.token_type_embeddings))
    for layer, blk in enumerate(base.encoder.layer):
        attn = blk.attention.self
        yield from block(
            layer,
            attn,
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
