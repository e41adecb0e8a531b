# Solutions to the exercises of tutorials/01_capture_and_intervene.ipynb, one block per exercise cell.
# `python -m neuronmap.course solve tutorials/01_capture_and_intervene.ipynb OUT.ipynb` puts each block into the
# cell tagged with its name. The blocks run in the notebook, after the cells above them, not as a script.

# %% exercise-1
answer = gpt2_trace["hook_embed"] + gpt2_trace["hook_pos_embed"]
for L in range(config.n_layer):
    answer = answer + gpt2_trace[f"blocks.{L}.hook_attn_out"] + gpt2_trace[f"blocks.{L}.hook_mlp_out"]

# %% exercise-2
n_heads = model.module.config.num_attention_heads
changes = []
for head in range(n_heads):
    run = model.run(sentences, interventions={f"blocks.{layer}.attn.hook_z": zero_head(head)})
    changes.append(similarity(run) - base_similarity)
most_important_head = max(range(n_heads), key=lambda h: abs(changes[h]))
print("change in similarity per head:", " ".join(f"{round(c, 3) + 0.0:+.3f}" for c in changes))  # + 0.0: no "-0.000"

# %% exercise-3
def patched_similarity(layer, position):
    name = f"blocks.{layer}.hook_resid_post"

    def patch(activation, hook):
        activation[:, position] = clean_trace[name][:, position]
        return activation

    return probe_similarity(model.run(corrupted, interventions={name: patch}))
