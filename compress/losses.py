"""Distillation losses: feature regression (CompRess/DisCo) and SEED relational distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.errors import ConfigError
from edge_ssl.train.distributed import gather_batch
from edge_ssl.train.methods.base import full_precision, loss_dtype, mlp_head


def distill_head(student_dim: int, teacher_dim: int, hidden_dim: int = 512) -> nn.Sequential:
    """Linear-BN-ReLU-Linear from the student's embedding to the teacher's dimension.

    CompRess, DisCo and SEED all put a small MLP on the student so its embedding
    dimension may differ from the teacher's; the head is dropped after training.
    """
    return mlp_head((student_dim, hidden_dim, teacher_dim))


class FeatureRegressionLoss(nn.Module):
    """Cosine regression of projected student embeddings onto teacher embeddings.

    CompRess (Abbasi Koohpayegani et al., arXiv:2010.14713) and DisCo (Gao et al.,
    arXiv:2104.09124) regress the teacher's embedding with a projected student one.
    Loss: ``mean_i (1 - cos(p_i, t_i))``; ``p``: (N, D) projected student, ``t``: (N, D)
    teacher. 0 when the directions agree, 2 when opposite.
    """

    def forward(self, projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _check_pair(projected, teacher)
        with full_precision(projected):
            cos = F.cosine_similarity(loss_dtype(projected), loss_dtype(teacher).detach(), dim=1)
            return (1.0 - cos).mean()


class SEEDLoss(nn.Module):
    """SEED (Fang et al., arXiv:2101.04731, Eq. 2-4): match the teacher's similarity distribution.

    With a queue ``Q`` (K, D) of l2-normalized teacher embeddings and the batch's teacher
    embeddings ``t`` (N, D) appended as the last anchor of each row, the teacher gives
    ``p^T_i = softmax([t_i Q^T, t_i . t_i] / tau_t)`` and the student
    ``p^S_i = softmax([s_i Q^T, s_i . t_i] / tau_s)``; the loss is the cross entropy
    ``-mean_i sum_j p^T_ij log p^S_ij``. After each step the (gathered) teacher
    embeddings enter the queue, oldest out. The paper uses tau_s = 0.2, tau_t = 0.01 (their
    ImageNet setting) and a 65,536-long queue; smaller data sets want a shorter queue.
    """

    def __init__(self, dim: int, queue_size: int = 4096, student_temperature: float = 0.2,
                 teacher_temperature: float = 0.05) -> None:
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ConfigError(f"SEEDLoss needs dim >= 1 and queue_size >= 1; got {dim}, {queue_size}.")
        if not (student_temperature > 0 and teacher_temperature > 0):
            raise ConfigError(
                "SEEDLoss temperatures must be > 0; got "
                f"student {student_temperature}, teacher {teacher_temperature}."
            )
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        # Random unit vectors at start, as in MoCo/SEED; they are pushed out within K / N steps.
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def forward(self, projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        _check_pair(projected, teacher)
        with full_precision(projected):
            s = F.normalize(loss_dtype(projected), dim=1)
            t = F.normalize(loss_dtype(teacher).detach(), dim=1)
            queue = self.queue.clone().detach().to(t.dtype)
            teacher_logits = torch.cat([t @ queue.T, (t * t).sum(1, keepdim=True)], dim=1)
            student_logits = torch.cat([s @ queue.T, (s * t).sum(1, keepdim=True)], dim=1)
            target = F.softmax(teacher_logits / self.teacher_temperature, dim=1)
            log_p = F.log_softmax(student_logits / self.student_temperature, dim=1)
            loss = -(target * log_p).sum(dim=1).mean()
        self._enqueue(t)
        return loss

    @torch.no_grad()
    def _enqueue(self, teacher: torch.Tensor) -> None:
        if not self.training:
            return
        keys = gather_batch(teacher.detach()).to(self.queue.dtype)
        size = self.queue.shape[0]
        keys = keys[-size:]
        start = int(self.pointer)
        index = (torch.arange(len(keys), device=keys.device) + start) % size
        self.queue[index] = keys
        self.pointer.fill_((start + len(keys)) % size)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ConfigError(
            f"distillation losses need (N, D) student projections and teacher embeddings of "
            f"the same shape; got {tuple(student.shape)} and {tuple(teacher.shape)}. Project the "
            "student to the teacher's dimension with distill_head first."
        )
