"""Converters from public datasets to the MSD layout dpunet reads, and a synthetic task generator.

- `generate_synthetic.generate_synthetic_task`: seeded synthetic 2D/3D tasks for tests and the demo;
- `convert_camvid.convert_camvid`: CamVid (11 classes + void, RGB) -> Task101_CamVid;
- `convert_isbi2012.convert_isbi2012`: ISBI 2012 EM membranes -> Task102_ISBI2012.
"""
