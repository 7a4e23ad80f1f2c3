"""Keys and the keyed block-wise ciphers (the EtC family): the lowest layer, numpy and torch only."""
