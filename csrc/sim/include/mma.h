// CPU stand-in for <mma.h> when csrc/ is built for cuda_sim (see ../cuda_sim.h).
#pragma once
#include "../cuda_sim.h"
