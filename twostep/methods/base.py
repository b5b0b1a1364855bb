"""The contract between a distillation method and the training loop (twostep.train).

A method builds its networks from the config (the student from cfg.student, then its critic), lists each parameter
set, freezes the critic around the student's loss, says which batch keys it reads and which log keys it reports,
and receives what it needs from the loaded teacher through one set-up hook. The loop calls `critic_loss(batch)`
(train.d_updates times) and `student_loss(batch)` per update and knows nothing of what the losses mean.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from ..discriminator import check_blocks
from ..errors import UserError
from ..student import TwoStepStudent


class Method:
    name: ClassVar[str]                          # registry key and config `method`
    log_keys: ClassVar[tuple[str, ...]]          # scalar log keys this method reports, in display order
    sections: ClassVar[dict[str, type]] = {}     # the method's own config sections: {YAML name: dataclass}
    shared_only: ClassVar[bool] = False          # defined with one parameter set for both steps
    block_keys: ClassVar[tuple[str, ...]] = ("disc.blocks",)   # config keys that index the teacher's blocks

    def __init__(self, cfg, teacher):
        self.check_config(cfg)
        self.check_blocks(cfg, teacher.num_blocks)
        self.cfg = cfg
        self.teacher = teacher                   # frozen ZImageBackbone; never updated
        s = cfg.student
        self.student = TwoStepStudent(teacher, s.decoupling, s.sigma_mid, s.mid_noise, s.lora_rank,
                                      s.lora_alpha, s.lora_targets)
        self.critic = self.build_critic(cfg, teacher)   # after the student: both draw from the torch RNG

    def check_config(self, cfg) -> None:
        """Refuse a configuration the method is not defined for (a UserError), before anything is built."""
        if self.shared_only and cfg.student.decoupling != "shared":
            raise UserError(f"method {self.name} is defined with one set of parameters for both steps; set "
                            f"student.decoupling=shared (configs/{self.name}.yaml does), got "
                            f"{cfg.student.decoupling!r}")

    @classmethod
    def check_blocks(cls, cfg, num_blocks: int) -> None:
        """Refuse a `block_keys` entry outside the teacher's blocks (a UserError naming the key), before anything
        is built."""
        for key in cls.block_keys:
            section, name = key.split(".")
            check_blocks(getattr(getattr(cfg, section), name), num_blocks, key)

    def build_critic(self, cfg, teacher) -> nn.Module | None:
        """The discriminator / critic the method trains beside the student (None: none)."""
        return None

    # -- what the loop needs to know ---------------------------------------------------------------------
    def setup(self, teacher) -> None:
        """Called once by the loop after construction with the loaded twostep.model.Teacher."""

    def check_teacher(self, teacher) -> None:
        """Refuse a teacher this configuration cannot train with (a UserError)."""
        if "data_real" in self.needs() and teacher.parts is not None:
            raise UserError("disc.real=data needs a pixel-space teacher; a ZImagePipeline teacher distills in latent "
                            "space: use disc.real=teacher")

    def real_key(self) -> str:
        """The batch key of the GAN's real images: the teacher's cached samples or data (disc.real)."""
        return "teacher_final" if self.cfg.disc.real == "teacher" else "data_real"

    def needs(self) -> set[str]:
        """Batch keys this configuration reads (the loop loads data_real / teacher_mid only when listed)."""
        return {"noise", "text", self.real_key()}

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [] if self.critic is None else list(self.critic.parameters())

    def modules(self) -> dict[str, nn.Module]:
        """The trainable modules by checkpoint name ("critic" only when it has parameters)."""
        return {"student": self.student, **({"critic": self.critic} if self.critic_parameters() else {})}

    def backprop_modules(self) -> list[nn.Module]:
        """Every module the loop back-propagates through: the student, the frozen teacher (the discriminator pass
        reaches the student through its blocks) and the critic."""
        return [m for m in (self.student, self.teacher, self.critic) if isinstance(m, nn.Module)]

    @contextmanager
    def critic_frozen(self):
        """The critic without requires_grad inside (the student's loss must not train it), trainable after."""
        if self.critic is None:
            yield
            return
        self.critic.requires_grad_(False)
        try:
            yield
        finally:
            self.critic.requires_grad_(True)

    # -- the two losses -------------------------------------------------------------------------------------
    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def student_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # -- shared pieces --------------------------------------------------------------------------------------
    def sample_steps(self, b: int, device) -> torch.Tensor:
        """Which student step (1 or 2) each sample trains, uniform (the methods that train one step at a time;
        tests replace it to pin a path)."""
        return torch.randint(1, 3, (b,), device=device)

    def at_random_step(self, batch: dict, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, k): the student's prediction at a random step k per sample, the earlier step rolled out without
        gradient (TwoStepStudent.at_step)."""
        noise = batch["noise"]
        k = self.sample_steps(noise.shape[0], noise.device) if k is None else k
        return self.student.at_step(noise, batch["text"], k, batch.get("fresh_noise")), k
