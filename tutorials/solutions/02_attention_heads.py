# Solutions to the exercises of tutorials/02_attention_heads.ipynb, one block per exercise cell.
# `python -m neuronmap.course solve tutorials/02_attention_heads.ipynb OUT.ipynb` puts each block into the cell
# tagged with its name. The blocks run in the notebook, after the cells above them, not as a script.

# %% exercise-1
answer = torch.stack([patterns[layer].diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2)) for layer in patterns.layers])

# %% exercise-2
scores = torch.stack([
    standard_patterns[layer].diagonal(offset=-(length - 1), dim1=-2, dim2=-1)[..., 2:].mean(dim=(0, 2))
    for layer in standard_patterns.layers
])  # diagonal entry k is query length - 1 + k: the second copy starts at k = 2
layer, head = divmod(int(scores.argmax()), scores.shape[1])
strongest = (layer, head)

# %% exercise-3
import itertools

smallest = next(
    list(subset)
    for size in range(1, n_heads + 1)
    for subset in itertools.combinations(range(n_heads), size)
    if induction_without(subset) < clean / 4
)
print("smallest set:", smallest, f"→ {induction_without(smallest):.2f}")
