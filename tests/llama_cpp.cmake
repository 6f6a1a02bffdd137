# What `make test` builds of llama.cpp when pip compiles llama-cpp-python (the Makefile passes this file in CMAKE_ARGS
# as CMAKE_PROJECT_llama.cpp_INCLUDE, run as llama.cpp's project starts): its libraries without their `common`
# helpers and the HTTP client they alone use. The Python package loads libllama and ggml only; llama-cpp-python forces
# LLAMA_BUILD_COMMON on in its cache, which a variable set here, in llama.cpp's own scope, overrides.
set(LLAMA_BUILD_COMMON OFF)
