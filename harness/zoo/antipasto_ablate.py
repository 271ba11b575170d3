"""antipasto_ablate mutants: a strength that escapes [0, 1], directions that are not orthonormal."""

from impl.variants.antipasto_ablate import AntiPaSTOAblate, orthonormal

from . import Mutant


class StrengthUnclamped(AntiPaSTOAblate):
    """a used as is: a > 1 gives a negative eigenvalue (a sign flip), a < 0 one above 1 (amplification)."""

    def strength(self, ad):
        return ad.a


class DirectionsNotOrthonormal(AntiPaSTOAblate):
    """k > 1 directions only normalised, not orthogonalised (k = 1 stays right): C diag(ã) Cᵀ can exceed 1."""

    def directions(self, ad):
        if ad.c.shape[1] == 1:
            return orthonormal(ad.c)
        return ad.c / ad.c.norm(dim=0, keepdim=True)


MUTANTS = [
    Mutant("antipasto_ablate.strength_unclamped", StrengthUnclamped, "spectrum",
           "no clamp on a: the core's eigenvalues leave [0, 1] (the layer can amplify or flip)"),
    Mutant("antipasto_ablate.directions_not_orthonormal", DirectionsNotOrthonormal, "spectrum",
           "C not orthonormalised for k > 1: overlapping directions push an eigenvalue below 0"),
]
