"""Networks: CLIP factory, prior transformer, ADM UNets. Imports without Lightning."""
