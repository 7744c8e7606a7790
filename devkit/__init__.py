"""What the tests, the benchmarks and the lab share, and none of it ships to users (see
.comfyignore): finding and starting ComfyUI (comfy_env, comfy_server), the setup and test
commands of the Makefile (setup_env), ComfyUI's own model classes at tiny sizes (tiny_models,
ui_testpack), and the trained reference models with their weights (reference_model,
reference_unet, train_reference)."""
