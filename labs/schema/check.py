#!/usr/bin/env python3
"""Checks .clab.yml files against containerlab's own JSON schema
(labs/schema/clab.schema.json, draft-07). Its patterns use Unicode property
escapes (\\p{L}), which Python's re lacks: they go through the `regex`
module. Prints one line per file; exits 1 if any file is invalid.

    check.py SCHEMA FILE...
"""
import json
import sys

import jsonschema
import regex
import yaml


def pattern(validator, patrn, instance, schema):
    if validator.is_type(instance, "string") and not regex.search(patrn, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")


def main():
    schema = json.load(open(sys.argv[1]))
    Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": pattern})
    validator = Validator(schema)
    bad = 0
    for path in sys.argv[2:]:
        doc = yaml.safe_load(open(path))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        print(f"{path}: {'valid' if not errors else f'{len(errors)} errors'}")
        for e in errors:
            print(f"  at {'/'.join(str(p) for p in e.path) or '(top)'}: {e.message}")
        bad += bool(errors)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
