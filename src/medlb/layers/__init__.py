"""Sans-IO proxy decisions (ring 3): events in, decisions out."""
