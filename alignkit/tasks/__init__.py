"""Embedded demo tasks: the packaged base models (`embedded`) and the review demo data (`demo_data`).

Nothing is imported here, so `import alignkit` stays fast; import the submodules directly.
"""
