"""GGUF files: config, tokenizer and tensors (dequantized, or kept quantized for the CPU kernels)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from kvloom.logger import init_logger

logger = init_logger(__name__)

# GGUF architecture -> transformers model_type
_ARCHS = {
    "llama": "llama",  # "mixtral" when the file has experts
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral",
    "gemma3": "gemma3_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "bitnet": "bitnet",  # llama.cpp's BitNet b1.58 files (1bitLLM's Llama form: SiLU, sub-norms)
}
# whether the top-k router weights are renormalized, where the file does not say (as llama.cpp reads them)
_NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}

# GGUF tensor name pieces -> Hugging Face parameter name pieces
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # a mixture of experts' router
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# All experts of a layer in one [experts, rows, columns] tensor -> each expert's matrix
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
# where a family's layer names differ (Gemma 3: norms before and after attention and the MLP)
_ARCH_LAYER_NAMES = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "bitnet": {"attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"},
}
# Families whose norms scale by (1 + weight): llama.cpp's conversion stores 1 + weight.
_NORM_SHIFT = {"gemma3": 1.0}
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# Bump when what the cache holds (meta.json, tokenizer files) changes shape.
_CACHE_VERSION = 1


class GGUFConfig(SimpleNamespace):
    """A GGUF file's model config: the fields of a transformers config that kvloom reads (attributes)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class TensorInfo:
    name: str  # GGUF name
    type: int  # GGMLQuantizationType
    shape: list[int]  # torch order (rows first)
    offset: int  # absolute offset of the data in the file
    nbytes: int


class GGUFFile:
    """A GGUF file: architecture, config, tensor table and tokenizer.

    The header is read by ``read_header`` (the gguf package's GGUFReader takes 5 s on the default model:
    every tokenizer string becomes a numpy view). The results, and transformers' tokenizer conversion
    (2-3 s), are kept under $KVLOOM_CACHE_DIR/gguf, keyed by the file's path, size and mtime: a later
    start reads the tensor table from meta.json, memory-maps the data itself, and loads the converted
    tokenizer from disk.
    """

    def __init__(self, path: Path) -> None:
        from kvloom.backends.cpu.build import cache_dir

        self.path = path
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_VERSION}"
        self.cache = cache_dir() / "gguf" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        meta = self.cache / "meta.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            self.arch, self._config = m["arch"], m["config"]
            self.tensors = [TensorInfo(**t) for t in m["tensors"]]
            return
        metadata, self.tensors = read_header(path)
        self.arch = metadata.get("general.architecture")
        if self.arch not in _ARCHS:
            raise ValueError(
                f"model: unsupported GGUF architecture {self.arch!r} (supported: {', '.join(_ARCHS)})"
            )
        freqs = next((t for t in self.tensors if t.name == "rope_freqs.weight"), None)
        factors = None
        if freqs is not None:  # Llama 3.1+ rope scaling, as llama.cpp stores it: a divisor per frequency
            if freqs.type != GGMLQuantizationType.F32:
                raise ValueError(f"model: rope_freqs of type {GGMLQuantizationType(freqs.type).name}")
            data = np.memmap(path, dtype=np.uint8, mode="r")[freqs.offset : freqs.offset + freqs.nbytes]
            factors = [float(x) for x in data.view(np.float32)]
        self._config = _config_kwargs(metadata, {t.name for t in self.tensors}, self.arch, factors)
        _write_atomic(
            meta,
            json.dumps(
                {"arch": self.arch, "config": self._config, "tensors": [t.__dict__ for t in self.tensors]}
            ),
        )

    def hf_config(self):  # noqa: ANN201 - GGUFConfig or transformers.PretrainedConfig
        """The metadata as a config object with the family's model_type.

        NOTE: not transformers' config classes: importing transformers costs 1.3-2 s of start-up (3 s more
        for LlamaConfig, whose module pulls in torch.distributed.tensor), and kvloom's models read only
        these fields. Rope scalings other than the default go through a plain PretrainedConfig, which
        transformers' rope functions take. Where a transformers model must be built from it (the
        reference in tests and benchmarks), use `transformers_config`.
        """
        rope = self._config["rope_parameters"]
        kinds = rope.values() if "rope_type" not in rope else [rope]  # one rope per layer type (Gemma 3)
        if all(k["rope_type"] == "default" for k in kinds):
            return GGUFConfig(model_type=self.model_type, **self._config)
        from transformers import PretrainedConfig

        cls = type(
            f"GGUF{self.arch.capitalize()}Config", (PretrainedConfig,), {"model_type": self.model_type}
        )
        return cls(**self._config)

    @property
    def model_type(self) -> str:
        """transformers' model_type of the file's family (a llama file with experts is Mixtral)."""
        return (
            "mixtral" if self.arch == "llama" and self._config.get("num_local_experts") else _ARCHS[self.arch]
        )

    def transformers_config(self):  # noqa: ANN201 - e.g. transformers.LlamaConfig
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self._config)

    def load_tokenizer(self):  # noqa: ANN201 - kvloom.tokenizer.FastTokenizer
        """The tokenizer, converted on a first start (kvloom.loader.gguf_tokenizer, else transformers) and
        saved in the cache; later starts load it without importing transformers (kvloom.tokenizer).
        KVLOOM_GGUF_TOKENIZER=transformers makes transformers convert every file (the tests' reference)."""
        from kvloom.tokenizer import FastTokenizer

        saved = self.cache / "tokenizer"
        if (saved / "tokenizer_config.json").is_file():
            fast = FastTokenizer.load(saved)
            if fast is not None:
                return fast
            from transformers import AutoTokenizer

            return FastTokenizer.wrap(AutoTokenizer.from_pretrained(saved), saved)  # an older cache
        from kvloom.loader.gguf_tokenizer import TOKENIZER_KEYS, convert, save_for_transformers

        # Byte-level BPE files are converted here (no transformers import: 2-3 s of a first start), the
        # others by transformers.
        converted = (
            None
            if os.environ.get("KVLOOM_GGUF_TOKENIZER") == "transformers"
            else convert(read_header(self.path, TOKENIZER_KEYS)[0])
        )
        tok = None
        if converted is None:
            from transformers import PreTrainedTokenizerFast

            # NOTE: the class AutoTokenizer picks for a GGUF file, without its detour through the model
            # config (which parses the whole header with GGUFReader again: 5 s). Tested to encode alike.
            tok = PreTrainedTokenizerFast.from_pretrained(self.path.parent, gguf_file=self.path.name)
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            if converted is not None:
                backend, info, config = converted
                save_for_transformers(Path(tmp), backend, config, info["chat_template"])
                # transformers names a GGUF tokenizer by the file's folder
                FastTokenizer.write(Path(tmp), backend, info | {"name_or_path": str(self.path.parent)})
            else:
                tok.save_pretrained(tmp)
                FastTokenizer.save(tok, Path(tmp))
            try:
                os.rename(tmp, saved)
            except OSError:  # another process saved it first
                pass
            else:
                os.mkdir(tmp)  # for TemporaryDirectory's clean-up
        fast = FastTokenizer.load(saved, hf=tok)
        if fast is None:
            raise RuntimeError(f"model: the tokenizer saved at {saved} could not be read back")
        return fast

    def iter_tensors(self, hf_config, dtype: torch.dtype, keep_quantized: bool, shard) -> Iterator[tuple]:  # noqa: ANN001
        """See Checkpoint.iter_tensors. A slice (``shard``) of a quantized tensor is cut from its blocks:
        rows as they are, columns where the slice starts and ends on block boundaries (else the rows are
        dequantized and cut, logged once)."""
        from kvloom.layers.quantization import GGUF_NATIVE, from_gguf
        from kvloom.quantization.bitnet import TERNARY, ternary_rows

        tied = getattr(hf_config, "tie_word_embeddings", False)
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        head_dim = (
            getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        )
        shift = _NORM_SHIFT.get(self.arch)
        dense: dict[str, int] = {}  # GGUF types of matrices the backend does not run: how many
        # BitNet: the ternary layers' optional per-tensor scales (blk.N.attn_q.scale), by weight name
        scale_tensors = [t for t in self.tensors if self.arch == "bitnet" and t.name.endswith(".scale")]
        scales = {
            t.name.removesuffix(".scale") + ".weight": float(
                _float_array(data[t.offset : t.offset + t.nbytes], GGMLQuantizationType(t.type), [-1])[0]
            )
            for t in scale_tensors
        }
        scale_names = {t.name for t in scale_tensors}

        def matrix(gguf_name: str, name: str, qtype: GGMLQuantizationType, raw: np.ndarray, shape: list[int]):
            """One tensor (or one expert's matrix of a stacked tensor) as the model takes it."""
            shape = list(shape)
            rows, cols = shape if len(shape) == 2 else (0, 0)
            nbytes = raw.size
            part = shard(name)
            dense_cut = None  # (dim, start, length) to cut after dequantizing
            if part is not None:
                dim, start, n = part
                if len(shape) == 1:
                    dense_cut = part
                elif dim == 0:
                    raw = raw.reshape(rows, nbytes // rows)[start : start + n].reshape(-1)
                    rows = shape[0] = n
                else:
                    block, type_size = GGML_QUANT_SIZES[qtype]
                    if start % block == 0 and n % block == 0:
                        b = raw.reshape(rows, nbytes // rows)
                        raw = np.ascontiguousarray(
                            b[:, start // block * type_size : (start + n) // block * type_size]
                        )
                        cols = shape[1] = n
                        raw = raw.reshape(-1)
                    else:
                        dense_cut = part
                        _log_dense_cut(gguf_name, qtype.name, block)
            ternary = (
                self.arch == "bitnet" and name.split(".")[-2] in TERNARY
            )  # BitNet's int8-activation layers
            native = keep_quantized and qtype in GGUF_NATIVE and len(shape) == 2 and dense_cut is None
            native = native and not ternary
            embed = name.endswith("embed_tokens.weight")
            if (
                keep_quantized
                and not native
                and not ternary
                and len(shape) == 2
                and qtype not in _FLOAT_TYPES
            ):
                dense[qtype.name] = dense.get(qtype.name, 0) + 1
            if native and (name.endswith("_proj.weight") or name == "lm_head.weight" or tied and embed):
                qw = from_gguf(qtype, raw, rows, cols)
                if self.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                    # whole heads (a rank's slice holds whole heads): the permutation is within each
                    qw = qw.permute_rows(lambda a, n=rows // head_dim: _unpermute_rope_rows(a, n))
                if embed:
                    # Tied: the output layer runs on the file's quantized embedding; the lookup table
                    # itself is dense (one row read per token).
                    yield "lm_head.weight", qw
                    yield name, qw.dequantize(dtype)
                    return
                yield name, qw
                return
            array = _float_array(raw, qtype, shape)
            if dense_cut is not None:
                dim, start, n = dense_cut
                array = array[(slice(None),) * dim + (slice(start, start + n),)]
            if self.arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                array = _unpermute_rope_rows(array, array.shape[0] // head_dim)
            if ternary:  # whatever the type (TQ1_0, TQ2_0, F16, ...): ternary times a scale per row
                w = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
                yield name, ternary_rows(w * scales.get(gguf_name, 1.0), gguf_name)
                return
            # NOTE: views of the read-only memory map; torch wants its own writable copy.
            array = np.ascontiguousarray(array) if array.flags.writeable else array.copy()
            if shift is not None and name.endswith("norm.weight"):
                array -= shift  # float32, before the cast: the weight as the family's norm takes it
            yield name, torch.from_numpy(array).to(dtype)

        for t in self.tensors:
            qtype = GGMLQuantizationType(t.type)
            raw = data[t.offset : t.offset + t.nbytes]
            parts = t.name.split(".")
            if len(parts) == 4 and parts[0] == "blk" and parts[2] in _EXPERT_NAMES:
                # a layer's experts stacked [experts, rows, columns]: each expert's matrix on its own
                per = t.nbytes // t.shape[0]
                for e in range(t.shape[0]):
                    name = f"model.layers.{parts[1]}.mlp.experts.{e}.{_EXPERT_NAMES[parts[2]]}.weight"
                    yield from matrix(t.name, name, qtype, raw[e * per : (e + 1) * per], t.shape[1:])
                continue
            name = _hf_name(t.name, self.arch)
            if name is not None and t.name not in scale_names:
                yield from matrix(t.name, name, qtype, raw, t.shape)
        if dense:
            logger.info(
                "GGUF: %s run dequantized to %s (the CPU kernels run %s blocks as they are)",
                ", ".join(f"{n} {k} tensors" for k, n in sorted(dense.items())),
                str(dtype).removeprefix("torch."),
                "/".join(t.name for t in GGUF_NATIVE),
            )


# GGUF metadata value types: the fixed-size ones (struct format), 8 = string, 9 = array
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_SMALL_ARRAY = 64  # longer arrays (the vocabulary, merges) are read as their length only


def read_header(path: Path, full: frozenset[str] = frozenset()) -> tuple[dict, list[TensorInfo]]:
    """A GGUF file's metadata and tensor table, straight from the header (GGUF v2/v3).

    Arrays of more than 64 values are given as ``{"length": n}`` unless their key is in `full`: the
    config needs only the vocabulary's size, the tokenizer conversion (kvloom.loader.gguf_tokenizer) the
    vocabulary, token types and merges themselves.
    """
    with open(path, "rb") as f:
        mm = np.memmap(f, dtype=np.uint8, mode="r")
    buf = memoryview(mm)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"model: {path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"model: GGUF version {version} is not supported (2 and 3 are)")
    pos = 24

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n

    def value(kind: int, pos: int, whole: bool = False) -> tuple[object, int]:
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            item, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if whole and item != _STRING and item != _ARRAY:
                fmt = _SCALARS[item]
                values = list(struct.unpack_from(f"<{n}{fmt[1:]}", buf, pos))
                return values, pos + n * struct.calcsize(fmt)
            if n > _SMALL_ARRAY and not whole:
                if item == _STRING:
                    for _ in range(n):
                        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                else:
                    pos += n * struct.calcsize(_SCALARS[item])
                return {"length": n}, pos
            values = []
            for _ in range(n):
                v, pos = value(item, pos)
                values.append(v)
            return values, pos
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)

    metadata = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = value(kind, pos + 4, key in full)
    entries = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        entries.append((name, [int(d) for d in reversed(dims)], qtype, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in entries:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        tensors.append(
            TensorInfo(name, qtype, shape, data_start + offset, int(np.prod(shape)) // block * type_size)
        )
    return metadata, tensors


def _config_kwargs(metadata: dict, tensor_names: set[str], a: str, freq_factors: list[float] | None) -> dict:
    """transformers config arguments from the GGUF metadata (JSON-serializable: cached in meta.json).
    ``freq_factors``: the rope_freqs tensor (each rotary frequency is divided by its factor)."""
    get = metadata.get
    n_heads = get(f"{a}.attention.head_count")
    hidden = get(f"{a}.embedding_length")
    vocab = get(f"{a}.vocab_size") or metadata["tokenizer.ggml.tokens"]["length"]
    rope: dict = {"rope_type": "default", "rope_theta": float(get(f"{a}.rope.freq_base", 10000.0))}
    scaling = get(f"{a}.rope.scaling.type")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(get(f"{a}.rope.scaling.factor")))
    elif scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=float(get(f"{a}.rope.scaling.factor")),
            original_max_position_embeddings=int(get(f"{a}.rope.scaling.original_context_length")),
        )
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if get(f"{a}.rope.scaling.{key}") is not None:
                rope[name] = float(get(f"{a}.rope.scaling.{key}"))
    elif scaling not in (None, "none"):
        raise ValueError(f"model: GGUF rope scaling {scaling!r} is not supported")
    if freq_factors is not None:
        if rope["rope_type"] != "default":
            raise ValueError(f"model: rope_freqs beside {rope['rope_type']} rope scaling")
        rope["freq_factors"] = freq_factors
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get(f"{a}.feed_forward_length")),
        num_hidden_layers=int(get(f"{a}.block_count")),
        num_attention_heads=int(n_heads),
        num_key_value_heads=int(get(f"{a}.attention.head_count_kv", n_heads)),
        head_dim=int(get(f"{a}.attention.key_length", hidden // n_heads)),
        max_position_embeddings=int(get(f"{a}.context_length", 2048)),
        rms_norm_eps=float(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_id=get("tokenizer.ggml.eos_token_id"),
    )
    if get(f"{a}.attention.sliding_window") is not None:
        kwargs["sliding_window"] = int(get(f"{a}.attention.sliding_window"))
    if a == "gemma3":
        _gemma3_kwargs(kwargs, get)
    if a == "bitnet":
        kwargs["hidden_act"] = "silu"  # llama.cpp's BitNet graph gates with SiLU (its GGUF says nothing)
    if get(f"{a}.expert_count"):
        experts = int(get(f"{a}.expert_count"))
        kwargs["num_local_experts" if a == "llama" else "num_experts"] = experts
        kwargs["num_experts_per_tok"] = int(get(f"{a}.expert_used_count"))
        norm = get(f"{a}.expert_weights_norm")
        kwargs["norm_topk_prob"] = bool(_NORM_TOPK.get(a, False) if norm is None else norm)
        if get(f"{a}.expert_feed_forward_length") is not None:
            kwargs["moe_intermediate_size"] = int(get(f"{a}.expert_feed_forward_length"))
        if get(f"{a}.expert_shared_feed_forward_length") is not None:
            kwargs["shared_expert_intermediate_size"] = int(get(f"{a}.expert_shared_feed_forward_length"))
    return kwargs


def _gemma3_kwargs(kwargs: dict, get) -> None:  # noqa: ANN001
    """What a Gemma 3 GGUF file leaves to the reader, as llama.cpp reads it: every sixth layer global
    (the rest slide), local layers rotating with base 10000 unscaled, and q.k scaled by head_dim ** -0.5
    (hidden / heads for the 62-layer 27B)."""
    n = kwargs["num_hidden_layers"]
    kwargs["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    kwargs["rope_parameters"] = {
        "full_attention": kwargs["rope_parameters"],
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    heads = kwargs["num_attention_heads"]
    kwargs["query_pre_attn_scalar"] = kwargs["hidden_size"] // heads if n == 62 else kwargs["head_dim"]
    kwargs["hidden_activation"] = "gelu_pytorch_tanh"
    kwargs["final_logit_softcapping"] = get("gemma3.final_logit_softcapping")
    kwargs["attn_logit_softcapping"] = get("gemma3.attn_logit_softcapping")


@functools.cache
def _log_dense_cut(name: str, qtype: str, block: int) -> None:
    logger.warning(
        "tensor parallel: %s (%s, blocks of %d) splits within its blocks; this rank runs its slice "
        "dequantized",
        name,
        qtype,
        block,
    )


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _float_array(raw: np.ndarray, qtype: GGMLQuantizationType, shape: list[int]) -> np.ndarray:
    """Raw bytes as float32 values of ``shape`` (F32 as they are, F16 widened, blocks dequantized)."""
    if qtype == GGMLQuantizationType.F32:
        array = raw.view(np.float32)
    elif qtype == GGMLQuantizationType.F16:
        array = raw.view(np.float16).astype(np.float32)
    else:
        row_bytes = raw.size // max(1, int(np.prod(shape[:-1])))
        array = dequantize(raw.reshape(-1, row_bytes), qtype)
    return array.reshape(shape)


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    if parts[0] == "blk" and len(parts) == 5 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
        # older Mixtral files: one tensor per expert (blk.N.ffn_gate.E.weight)
        return f"model.layers.{parts[1]}.mlp.experts.{parts[3]}.{parts[2][4:]}_proj.{parts[4]}"
    return None


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's conversion-time permutation of q/k rows (interleaved -> half-split rotary)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
