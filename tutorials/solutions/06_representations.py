# Solutions to the exercises of tutorials/06_representations.ipynb, one block per exercise cell.
# `python -m neuronmap.course solve tutorials/06_representations.ipynb OUT.ipynb` puts each block into the cell
# tagged with its name. The blocks run in the notebook, after the cells above them, not as a script.

# %% exercise-1
def linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)  # centre every feature over the samples
    return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()

# %% exercise-2
seen_before = []  # one entry per real token, in the order of as_matrix's rows
for row, mask in zip(trace.tokens.tolist(), real.tolist()):
    seen = set()
    for token, live in zip(row, mask):
        if live:
            seen_before.append(token in seen)
            seen.add(token)
repeated = torch.tensor(seen_before)[is_name].long()
repeated_curve = probe_by_layer(names_only, repeated, points, token_types=ids[is_name])
for point in points:
    print(f"{point:24} accuracy {repeated_curve[point].accuracy:.3f}")
first_readable = next(point for point in points if repeated_curve[point].accuracy >= 0.95)
print(first_readable)

# %% exercise-3
def lens(resid):
    return model.module.transformer.ln_f(resid) @ model.weights.W_U + model.weights.b_U

# %% exercise-4
run = model.run(prompt["prompt"], capture=["blocks.1.attn.hook_z", "ln_final.hook_scale"])
written = run["blocks.1.attn.hook_z"][0, -1, 2] @ model.weights.blocks[1].attn.W_O[2]  # [d_model]
normed = (written - written.mean()) / run["ln_final.hook_scale"][0, -1] * model.module.transformer.ln_f.weight
io, s = model.tokenizer.convert_tokens_to_ids([prompt["io"], prompt["s"]])
head_effect = (normed @ (model.weights.W_U[:, io] - model.weights.W_U[:, s])).item()
print(f"{head_effect:+.3f}")
