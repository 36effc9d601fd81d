"""The messaging core: validate, sequence, persist, route, fan out."""
