# Solutions to the exercises of tutorials/03_patching.ipynb, one block per exercise cell.
# `python -m neuronmap.course solve tutorials/03_patching.ipynb OUT.ipynb` puts each block into the cell tagged
# with its name. The blocks run in the notebook, after the cells above them, not as a script.

# %% exercise-1
def mean_logit_diff(trace):
    last = trace.logits[:, -1]  # every prompt has the same length: -1 is each one's final token
    rows = torch.arange(len(last))
    return (last[rows, io_ids] - last[rows, s_ids]).mean().item()

# %% exercise-2
def patched_logit_diff(layer, position):
    name = f"blocks.{layer}.hook_resid_post"

    def patch(activation, hook):
        activation[:, position] = clean_trace[name][:, position]
        return activation

    return mean_logit_diff(model.run(corrupt, interventions={name: patch}))

# %% exercise-3
n_layers, n_heads = path.values.shape
direct_heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if 1 - path.values[layer, head] >= 0.1]
print(direct_heads)
