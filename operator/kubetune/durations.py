"""The training-duration grammar: a positive integer and a unit, `1ep`, `1000000tok`, `500ba`.

One pattern for the API validation and the CRD's OpenAPI pattern and CEL rule, so they never
disagree about what a duration is. It is written in the common subset of Python `re` and RE2.
"""

# No leading zeros and no zero: a zero-length run is always a mistake.
DURATION_PATTERN = r"^[1-9][0-9]*(ep|tok|ba)$"
