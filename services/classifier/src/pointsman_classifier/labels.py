"""Label sets of the two heads, in the order of the model outputs (from the event contracts)."""

from pointsman.events import Domain, Risk

DOMAINS: tuple[str, ...] = tuple(d.value for d in Domain)
RISKS: tuple[str, ...] = tuple(r.value for r in Risk)
