"""Device dialects: how a family of firmware (EMQX commands, Kaa CEX) talks to the control plane."""
