# ctest driver: install lim into a scratch prefix, then build and run the consumer against it,
# once through find_package(lim) and once through pkg-config.
file(REMOVE_RECURSE ${SCRATCH_DIR})
set(prefix ${SCRATCH_DIR}/prefix)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

run(${CMAKE_COMMAND} --install ${LIM_BUILD_DIR} --prefix ${prefix})
# The installed limctl runs from the scratch prefix (its RUNPATH finds the installed liblim), with
# no LD_LIBRARY_PATH.
if(EXISTS ${prefix}/bin/limctl)
  set(ENV{LD_LIBRARY_PATH} "")
  run(${prefix}/bin/limctl --help)
  run(${prefix}/bin/limctl ls)
  execute_process(COMMAND readelf -d ${prefix}/bin/limctl OUTPUT_VARIABLE dyn)
  if(NOT dyn MATCHES "RUNPATH.*\\$ORIGIN/\\.\\./lib")
    message(FATAL_ERROR "installed limctl has no $ORIGIN RUNPATH:\n${dyn}")
  endif()
endif()
run(${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${SCRATCH_DIR}/build
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release)
run(${CMAKE_COMMAND} --build ${SCRATCH_DIR}/build)
run(${SCRATCH_DIR}/build/consumer)

# pkg-config: compile and link the same program with the flags lim.pc gives.
find_program(PKG_CONFIG pkg-config REQUIRED)
set(ENV{PKG_CONFIG_PATH} ${prefix}/lib/pkgconfig)
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs lim OUTPUT_VARIABLE flags
                OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config does not know lim")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
run(c++ -std=c++20 ${CONSUMER_SOURCE_DIR}/main.cpp -o ${SCRATCH_DIR}/consumer-pc ${flags}
    -Wl,-rpath,${prefix}/lib)
run(${SCRATCH_DIR}/consumer-pc)
