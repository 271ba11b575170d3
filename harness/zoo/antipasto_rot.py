"""antipasto_rot mutants: a non-orthogonal 'rotation', an angle clamp that is not a bound, a config check lost, a
block that never enters the forward."""
import math

import torch

from impl.variants.antipasto_rot import AntiPaSTORot, cayley

from . import Mutant


class UpperTriangleAsIs(AntiPaSTORot):
    """The strict upper triangle is used as the generator without making it skew-symmetric: the Cayley map of a
    non-skew matrix is not orthogonal."""

    def blocks(self, T, cfg):
        bs = cfg.block_size
        rows, cols = torch.triu_indices(bs, bs, offset=1)
        A = T.new_zeros(T.shape[0], bs, bs)
        A[:, rows, cols] = T
        c = 2.0 * math.tan(cfg.max_rotation_angle / 2.0) / math.sqrt(bs * (bs - 1) / 2.0)
        return cayley(c * torch.tanh(A / c))


class UnscaledClamp(AntiPaSTORot):
    """The reference's elementwise clamp at 2 tan(θ/2): a hard angle bound only for block size 2."""

    def blocks(self, T, cfg):
        from impl.variants.antipasto_rot import skew_blocks

        c = 2.0 * math.tan(cfg.max_rotation_angle / 2.0)
        return cayley(c * torch.tanh(skew_blocks(T, cfg.block_size) / c))


class BlockSizeUnchecked(AntiPaSTORot):
    @classmethod
    def check_blocks(cls, cfg):
        return None


class LastBlockDead(AntiPaSTORot):
    """A block loop one short where there are several blocks (a single block is still rotated): the last block
    stays I, so the last row of each rotation generator never enters the forward and gets no gradient, though it
    is a trainable Parameter. The rest of the tensor is live: a whole-tensor gradient check passes it."""

    def blocks(self, T, cfg):
        R = super().blocks(T, cfg)
        if R.shape[0] == 1:
            return R
        eye = torch.eye(cfg.block_size, dtype=R.dtype, device=R.device).expand(1, -1, -1)
        return torch.cat([R[:-1], eye], 0)


MUTANTS = [
    Mutant("antipasto_rot.non_orthogonal", UpperTriangleAsIs, "spectrum",
           "the strict upper triangle used as the Cayley generator, never made skew-symmetric: R not orthogonal"),
    Mutant("antipasto_rot.angle_clamp_unscaled", UnscaledClamp, "spectrum",
           "elementwise clamp at 2 tan(θ/2) (the reference's): rotation angles exceed max_rotation_angle for bs > 2"),
    Mutant("antipasto_rot.block_size_unchecked", BlockSizeUnchecked, "config_constraints",
           "a block size that does not divide r accepted at config time"),
    Mutant("antipasto_rot.last_block_dead", LastBlockDead, "gradient_pattern",
           "a block loop one short: the last of several rotation blocks stays I, its generator row gets no gradient"),
]
