"""The options the model command lines share (`python -m bmgpt_jax.chat`, `python -m bmgpt_jax.evaluate`):
the generation flags under their Hugging Face names plus `--stop-at-separator`, `--dtype`, `--mesh
data,fsdp,tensor`, and the model folder loaded in that dtype into that mesh's shards (`model_and_options`).
Every value is checked before anything is loaded; a bad one is a one-line error naming it.
"""
from __future__ import annotations

import argparse

from bmgpt_jax import parallel
from bmgpt_jax.convert.folder import from_pretrained
from bmgpt_jax.generation import GenerationConfig
from bmgpt_jax.inputs import check_model_folder, one_line

HF_OPTIONS = ("max_new_tokens", "do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
              "length_penalty", "seed")
OPTIONS = HF_OPTIONS + ("stop_at_separator",)   # ours: also stop at `###`, and cut the answer there
DTYPES = ("float32", "bfloat16", "float16")


def hf_options(options: dict) -> dict:
    """`options` less ours (`stop_at_separator`): the `GenerationConfig` fields."""
    return {k: v for k, v in options.items() if k in HF_OPTIONS}


def add_generation_args(ap) -> None:
    """`--dtype` and the generation options (HF names as flags, and `--stop-at-separator`) on a command line."""
    ap.add_argument("--dtype", choices=DTYPES, help="the dtype the LM and the protein encoder hold their weights and "
                    "compute in, each slice cast as it is read (default: the folder's, as its llm_config.json and "
                    "esm_config.json record it, as transformers' from_pretrained loads)")
    for name, kind in (("max_new_tokens", int), ("num_beams", int), ("temperature", float), ("top_k", int),
                       ("top_p", float), ("repetition_penalty", float), ("length_penalty", float), ("seed", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=kind)
    ap.add_argument("--do-sample", action="store_true", default=None)
    ap.add_argument("--stop-at-separator", action="store_true", default=None,
                    help="stop decoding at the turn separator '###' too and cut the answer there (default: stop at "
                    "EOS only and keep the text after the last 'Assistant:', as the reference does)")


def mesh_shape(text: str) -> tuple[int, ...]:
    """`--mesh data,fsdp,tensor` (an argparse type), e.g. `1,1,8`; one entry may be -1 (the other devices)."""
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != len(parallel.MESH_AXES):
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. -1,1,1")
    return shape


def options_of(args) -> dict:
    """The generation options given on the line (HF names, `stop_at_separator`); ValueError naming the first
    out of its range."""
    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    GenerationConfig(**hf_options(options))
    return options


def mesh_of(args):
    """The mesh `args.mesh` (data,fsdp,tensor) asks for, None without one; a shape the devices do not fit is a
    one-line ValueError naming it."""
    shape = getattr(args, "mesh", None)
    try:
        return None if shape is None else parallel.make_mesh(shape)
    except ValueError as e:
        raise ValueError(f"--mesh {','.join(map(str, shape))}: {one_line(e)}") from None


def model_and_options(args):
    """(the checkpoint of `args.checkpoint` in `args.dtype`, the generation options given on the line, the
    mesh it lies on). The LM and the ESM hold their weights and compute in `args.dtype`, each slice cast as
    it is read (None: the dtype their config files record, as transformers' `from_pretrained(dtype="auto")`);
    the GIN as its gin_config.json says. With `args.mesh` (data,fsdp,tensor) the parameters are global
    arrays sharded by the rule table, each device given only its slices as they are read
    (`folder.from_pretrained(mesh=...)`), so no device ever holds a parameter whole that the rules shard;
    without it (None), all on the default device and the mesh is None. The folder is checked first
    (`inputs.check_model_folder`); any failure is FileNotFoundError or ValueError with a one-line message
    naming the file or the mesh."""
    options = options_of(args)
    folder = check_model_folder(args.checkpoint)
    mesh = mesh_of(args)
    dtypes = {"dtype": args.dtype, "param_dtype": args.dtype} if args.dtype else {}
    try:
        model = from_pretrained(folder, mesh=mesh, esm_overrides=dtypes, **dtypes)
    except Exception as e:  # noqa: BLE001 -- a command line reports what failed in one line
        raise ValueError(f"cannot load the model folder {folder}: {type(e).__name__}: {one_line(e)}") from e
    return model, options, mesh
